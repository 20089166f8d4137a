"""init_from: parameters and tokenizer from a workdir, a bundle or an HF folder; mismatches."""
import os

import jax
import numpy as np
import pytest

import task_models
from t5like.models import abstract_params, convert
from t5like.serve import bundle as bundle_lib
from t5like.train import init_from


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  tok = task_models.tiny_tokenizer()
  cfg, params = task_models.tiny_model(tok)
  root = tmp_path_factory.mktemp('init')
  _, other = task_models.tiny_model(tok, seed=1)
  workdir = str(root / 'run')
  # Step 2 has the lower validation loss: 'best' picks it, 'latest' picks step 3.
  task_models.save_workdir(workdir, cfg, params, tok, steps=(1, 2, 3), val_metrics=(3.0, 1.0, 2.0))
  bundle = bundle_lib.export_bundle(params, cfg, tok, str(root / 'bundle'))
  hf = str(root / 'hf')
  convert.export_hf_t5(cfg, params, hf, spiece_model=tok.model_proto)
  return dict(cfg=cfg, params=params, tok=tok, workdir=workdir, bundle=bundle, hf=hf, root=root)


def _same(a, b):
  return all(np.allclose(x, y, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('kind', ['workdir', 'bundle', 'hf'])
def test_load_each_kind(tiny, kind):
  pre = init_from.load_pretrained(tiny[kind])
  assert pre.kind == kind
  assert pre.tokenizer.model_proto == tiny['tok'].model_proto
  assert pre.cfg.d_model == tiny['cfg'].d_model and pre.cfg.vocab_size == tiny['cfg'].vocab_size
  merged = init_from.merge_params(abstract_params(pre.cfg), pre.params)
  assert _same(merged, tiny['params'])


def test_workdir_steps(tiny):
  assert init_from.load_pretrained(tiny['workdir'], 'best').source.endswith('/2')
  assert init_from.load_pretrained(tiny['workdir'], 'latest').source.endswith('/3')
  assert init_from.load_pretrained(tiny['workdir'], '1').source.endswith('/1')
  with pytest.raises(init_from.InitFromError, match=r'no checkpoint at step 7; it has \[1, 2, 3\]'):
    init_from.load_pretrained(tiny['workdir'], '7')
  with pytest.raises(init_from.InitFromError, match='init_step'):
    init_from.load_pretrained(tiny['workdir'], 'newest')


def test_mismatch_names_keys_and_partial_encoder(tiny):
  pre = init_from.load_pretrained(tiny['bundle'])
  bigger = tiny['cfg'].replace(num_decoder_layers=3, d_ff=256)
  with pytest.raises(init_from.InitFromError, match=r"shape mismatches \['decoder/stack/layers/"
                                                     r"layer/cross_attention/key/kernel"):
    init_from.merge_params(abstract_params(bigger), pre.params)
  fresh = jax.tree.map(np.asarray, task_models.tiny_model(tiny['tok'], seed=5,
                                                          num_decoder_layers=3)[1])
  # Encoder only: encoder and shared embedding loaded, the decoder keeps its fresh values.
  other = tiny['cfg'].replace(num_decoder_layers=3)
  merged = init_from.merge_params(fresh, pre.params, partial='encoder')
  assert _same(merged['encoder'], tiny['params']['encoder'])
  assert _same(merged['shared_embedding'], tiny['params']['shared_embedding'])
  assert _same(merged['decoder'], fresh['decoder'])
  assert other.num_decoder_layers == 3
  missing = dict(pre.params)
  del missing['encoder']
  with pytest.raises(init_from.InitFromError, match=r"missing keys \['encoder/"):
    init_from.merge_params(abstract_params(tiny['cfg']), missing)
  with pytest.raises(init_from.InitFromError, match='init_partial'):
    init_from.merge_params(abstract_params(tiny['cfg']), pre.params, partial='decoder')


def test_bad_paths(tiny, tmp_path):
  with pytest.raises(init_from.InitFromError, match='does not exist'):
    init_from.load_pretrained(str(tmp_path / 'nope'))
  (tmp_path / 'x.txt').write_text('x')
  with pytest.raises(init_from.InitFromError, match='neither a t5like workdir'):
    init_from.load_pretrained(str(tmp_path))
  hf_no_tok = tmp_path / 'hf2'
  convert.export_hf_t5(tiny['cfg'], tiny['params'], str(hf_no_tok))
  with pytest.raises(init_from.InitFromError, match='no spiece.model'):
    init_from.load_pretrained(str(hf_no_tok))
  empty = tmp_path / 'run'
  os.makedirs(empty / 'checkpoints')
  with pytest.raises(init_from.InitFromError, match='holds no checkpoint'):
    init_from.load_pretrained(str(empty))


@pytest.mark.parity
def test_hf_round_trip_tokenizer_and_greedy_parity(tiny):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  import jax.numpy as jnp
  from t5like.infer import decode
  from t5like.train import evaluation
  model = transformers.T5ForConditionalGeneration.from_pretrained(tiny['hf']).eval()
  texts = ['When shall we three meet againe?', 'Faire is foule, and foule is faire']
  for cls in (transformers.T5Tokenizer, transformers.AutoTokenizer):
    hf_tok = cls.from_pretrained(tiny['hf'])
    for t in texts:
      assert hf_tok(t).input_ids == tiny['tok'].encode(t) + [1]
    assert hf_tok.convert_tokens_to_ids('<extra_id_0>') == tiny['tok'].sentinel_id(0)
  rows = evaluation.encode_rows(tiny['tok'], texts, 32, 'parity')
  ours = np.asarray(decode.greedy(tiny['params'], tiny['cfg'], jnp.asarray(rows), 10).tokens)
  enc = hf_tok(texts, return_tensors='pt', padding=True)
  assert enc.input_ids.tolist() == [r[:enc.input_ids.shape[1]].tolist() for r in rows]
  with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, num_beams=1)
  for o, t in zip(ours.tolist(), out.tolist()):
    t = t[1:]                               # HF starts with the decoder start id
    o = o[:o.index(1) + 1] if 1 in o else o
    assert t[:len(o)] == o and all(x == 0 for x in t[len(o):])
