"""HF T5 <-> t5like conversion: bit-exact round trip, errors naming bad input, parity with
transformers' PyTorch T5ForConditionalGeneration (marked `parity`, skipped without torch)."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from t5like.config import ModelConfig, get_variant
from t5like.models import abstract_params, build_model, init_cache
from t5like.models import convert
from t5like.models.convert import (ConversionError, config_from_hf, config_to_hf, export_hf_t5,
                                   import_hf_t5)

ATOL = 1e-4


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in la] == [k for k, _ in lb]
  for (k, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, jax.tree_util.keystr(k)
    assert np.array_equal(x, y), jax.tree_util.keystr(k)


def _random_params(cfg, seed=0):
  """Random parameters in the tree of `init_params(cfg)`, without compiling the init."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    key = jax.tree_util.keystr(path)
    if 'scale' in key:   # norm scales away from 1, so a norm mix-up cannot hide
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    std = 1.0 if key.endswith("['embedding']") else cfg.d_model ** -0.5
    return (rng.normal(size=x.shape) * std).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def _exported(tmp_path, variant='t5_tiny', name='ckpt'):
  cfg = get_variant(variant)
  params = _random_params(cfg)
  folder = tmp_path / name
  export_hf_t5(cfg, params, folder)
  return cfg, params, folder


def _edit_tensors(folder, edit):
  path = folder / 'model.safetensors'
  tensors = dict(load_file(path))
  edit(tensors)
  save_file(tensors, path, metadata={'format': 'pt'})


def _edit_config(folder, edit):
  path = folder / 'config.json'
  hf = json.loads(path.read_text())
  edit(hf)
  path.write_text(json.dumps(hf))


# ---------------------------------------------------------------------------------------------
# Round trip and config mapping (no torch)


@pytest.mark.parametrize('variant', ['t5_tiny', 't5_1_1_tiny'])
def test_export_import_round_trip_is_bit_exact(tmp_path, variant):
  cfg, params, folder = _exported(tmp_path, variant)
  assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
  names = set(load_file(folder / 'model.safetensors'))
  assert 'shared.weight' in names
  assert 'encoder.block.1.layer.1.DenseReluDense.wo.weight' in names
  assert 'decoder.block.1.layer.1.EncDecAttention.o.weight' in names
  assert 'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight' in names
  assert ('lm_head.weight' in names) == (not cfg.tie_embeddings)
  gated = cfg.ffn_activation == 'gated-gelu'
  assert ('decoder.block.0.layer.2.DenseReluDense.wi_0.weight' in names) == gated
  cfg2, params2 = import_hf_t5(folder)
  assert cfg2 == cfg.replace(name='ckpt')
  _leaves_equal(params, params2)
  # Nothing left behind next to the folder (the temporary build folder was renamed).
  assert os.listdir(tmp_path) == ['ckpt']


@pytest.mark.parametrize('ffn', ['relu', 'gated-gelu', 'gelu', 'swiglu'])
@pytest.mark.parametrize('tie', [True, False])
def test_config_round_trip(ffn, tie):
  cfg = ModelConfig(name='x', vocab_size=300, d_model=40, num_heads=5, head_dim=12, d_ff=72,
                    num_encoder_layers=3, num_decoder_layers=2, ffn_activation=ffn,
                    tie_embeddings=tie, relative_attention_num_buckets=16,
                    relative_attention_max_distance=40, dropout_rate=0.05,
                    layer_norm_epsilon=1e-5, pad_id=0, eos_id=2, decoder_start_id=3)
  hf = json.loads(json.dumps(config_to_hf(cfg)))
  assert hf['model_type'] == 't5' and hf['is_encoder_decoder'] is True
  assert hf['architectures'] == ['T5ForConditionalGeneration']
  assert hf['d_kv'] == 12 and hf['num_layers'] == 3 and hf['num_decoder_layers'] == 2
  assert config_from_hf(hf, name='x') == cfg


def test_bfloat16_params_export(tmp_path):
  cfg = get_variant('t5_1_1_tiny')
  params = _random_params(cfg, 1)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  # Default float32 export of bf16 params is exact: import as pure_bf16 gives them back.
  export_hf_t5(cfg, bf16, tmp_path / 'f32')
  assert {v.dtype for v in load_file(tmp_path / 'f32' / 'model.safetensors').values()} == {
      np.dtype(np.float32)}
  cfg2, back = import_hf_t5(tmp_path / 'f32', precision='pure_bf16')
  assert cfg2.precision == 'pure_bf16'
  _leaves_equal(jax.tree.map(np.asarray, bf16), back)
  # dtype='bfloat16' writes BF16 tensors (f32 params rounded); import upcasts them exactly.
  export_hf_t5(cfg, params, tmp_path / 'bf16', dtype='bfloat16')
  assert json.loads((tmp_path / 'bf16' / 'config.json').read_text())['dtype'] == 'bfloat16'
  assert {v.dtype for v in load_file(tmp_path / 'bf16' / 'model.safetensors').values()} == {
      np.dtype(ml_dtypes.bfloat16)}
  _, back = import_hf_t5(tmp_path / 'bf16')
  _leaves_equal(jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)),
                             params), back)


def test_hf5_tied_unscaled_head_imports_as_separate_head(tmp_path):
  # transformers 5.x writes a T5 1.1 model as tie_word_embeddings=true, scale_decoder_outputs=false
  # and no lm_head.weight: the output layer is the shared embedding without rescale.
  cfg, params, folder = _exported(tmp_path, 't5_1_1_tiny')
  _edit_tensors(folder, lambda t: t.pop('lm_head.weight'))
  _edit_config(folder, lambda hf: hf.update(tie_word_embeddings=True, scale_decoder_outputs=False))
  cfg2, params2 = import_hf_t5(folder)
  assert not cfg2.tie_embeddings
  np.testing.assert_array_equal(params2['decoder']['lm_head']['kernel'],
                                np.asarray(params['shared_embedding']['embedding']).T)


def test_embed_tokens_duplicates_are_accepted_when_equal(tmp_path):
  cfg, params, folder = _exported(tmp_path)
  _edit_tensors(folder, lambda t: t.update({'encoder.embed_tokens.weight': t['shared.weight'],
                                            'decoder.embed_tokens.weight': t['shared.weight']}))
  _, params2 = import_hf_t5(folder)
  _leaves_equal(params, params2)


def test_sharded_checkpoint_imports(tmp_path):
  # Large HF checkpoints come as model.safetensors.index.json + shards.
  cfg, params, folder = _exported(tmp_path, 't5_1_1_tiny')
  tensors = dict(load_file(folder / 'model.safetensors'))
  os.remove(folder / 'model.safetensors')
  names = sorted(tensors)
  weight_map = {}
  for shard, part in (('model-00001-of-00002.safetensors', names[::2]),
                      ('model-00002-of-00002.safetensors', names[1::2])):
    save_file({n: tensors[n] for n in part}, folder / shard, metadata={'format': 'pt'})
    weight_map.update({n: shard for n in part})
  (folder / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  _, params2 = import_hf_t5(folder)
  _leaves_equal(params, params2)


def test_export_overwrite(tmp_path):
  cfg, _, folder = _exported(tmp_path)
  other = _random_params(cfg, 7)
  with pytest.raises(ConversionError, match='already exists.*overwrite=True'):
    export_hf_t5(cfg, other, folder)
  export_hf_t5(cfg, other, folder, overwrite=True)
  _leaves_equal(other, import_hf_t5(folder)[1])
  assert os.listdir(tmp_path) == ['ckpt']


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
  cfg = get_variant('t5_tiny')
  params = _random_params(cfg, 0)

  def failing_save(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(convert, 'save_file', failing_save)
  with pytest.raises(OSError, match='disk full'):
    export_hf_t5(cfg, params, tmp_path / 'ckpt')
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming the offending thing


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(ConversionError, match='does not exist'):
    import_hf_t5(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ConversionError, match='no config.json'):
    import_hf_t5(tmp_path / 'empty')


def test_missing_weights_file(tmp_path):
  _, _, folder = _exported(tmp_path)
  os.remove(folder / 'model.safetensors')
  with pytest.raises(ConversionError, match='model.safetensors'):
    import_hf_t5(folder)


def test_unknown_tensor_name(tmp_path):
  _, _, folder = _exported(tmp_path)
  bad = 'encoder.block.0.layer.0.SelfAttention.x.weight'
  _edit_tensors(folder, lambda t: t.update({bad: np.zeros((3,), np.float32)}))
  with pytest.raises(ConversionError, match=r'unknown tensor.*SelfAttention\.x\.weight'):
    import_hf_t5(folder)


def test_missing_tensor_name(tmp_path):
  _, _, folder = _exported(tmp_path)
  _edit_tensors(folder, lambda t: t.pop('decoder.block.1.layer.2.DenseReluDense.wo.weight'))
  with pytest.raises(ConversionError,
                     match=r'missing tensor.*decoder\.block\.1\.layer\.2\.DenseReluDense\.wo'):
    import_hf_t5(folder)


def test_shape_mismatch(tmp_path):
  _, _, folder = _exported(tmp_path)
  name = 'encoder.block.1.layer.0.SelfAttention.q.weight'
  _edit_tensors(folder, lambda t: t.update({name: np.zeros((64, 63), np.float32)}))
  with pytest.raises(ConversionError, match=r'SelfAttention\.q\.weight.*\[64, 63\].*\[64, 64\]'):
    import_hf_t5(folder)


def test_layer_count_mismatch_names_missing_block(tmp_path):
  _, _, folder = _exported(tmp_path)
  _edit_config(folder, lambda hf: hf.update(num_layers=3))
  with pytest.raises(ConversionError, match=r'missing tensor.*encoder\.block\.2\.'):
    import_hf_t5(folder)


def test_embed_duplicate_that_differs(tmp_path):
  _, _, folder = _exported(tmp_path)
  _edit_tensors(folder, lambda t: t.update({'decoder.embed_tokens.weight': t['shared.weight'] + 1}))
  with pytest.raises(ConversionError, match=r'decoder\.embed_tokens\.weight.*differs'):
    import_hf_t5(folder)


def test_non_float_tensor(tmp_path):
  _, _, folder = _exported(tmp_path)
  name = 'encoder.final_layer_norm.weight'
  _edit_tensors(folder, lambda t: t.update({name: np.zeros(t[name].shape, np.int8)}))
  with pytest.raises(ConversionError, match=r'encoder\.final_layer_norm\.weight.*dtype I8'):
    import_hf_t5(folder)


@pytest.mark.parametrize('edit,match', [
    (lambda hf: hf.pop('d_model'), r"\['d_model'\] missing"),
    (lambda hf: hf.update(feed_forward_proj='gated-relu'), "feed_forward_proj='gated-relu'"),
    (lambda hf: hf.update(model_type='bert'), "model_type='bert'"),
    (lambda hf: hf.update(d_ff='big'), r'config\.json\.d_ff must be int'),
])
def test_bad_config_fields(tmp_path, edit, match):
  _, _, folder = _exported(tmp_path)
  _edit_config(folder, edit)
  with pytest.raises(ConversionError, match=match):
    import_hf_t5(folder)


@pytest.mark.parametrize('variant,overrides,match', [
    ('decoder_tiny', {}, 'model.arch'),
    ('t5_tiny', {'shared_layer_groups': 1}, 'shared_layer_groups'),
    ('t5_tiny', {'quant': {'weights': 'int8'}}, 'quant.weights'),
    ('t5_tiny', {'quant': {'qat': 'int8'}}, 'quant.qat'),
])
def test_export_rejects_configs_hf_cannot_represent(tmp_path, variant, overrides, match):
  cfg = get_variant(variant, **overrides)
  params = _random_params(get_variant(variant), 0)
  with pytest.raises(ConversionError, match=match):
    export_hf_t5(cfg, params, tmp_path / 'x')
  assert not os.path.exists(tmp_path / 'x')


def test_export_rejects_wrong_params(tmp_path):
  cfg = get_variant('t5_tiny')
  params = _random_params(cfg, 0)
  wrong = _random_params(cfg.replace(d_ff=96), 0)
  with pytest.raises(ConversionError, match=r"\['mlp'\]\['wi'\]\['kernel'\].*\[2, 64, 96\]"):
    export_hf_t5(cfg, wrong, tmp_path / 'x')
  with pytest.raises(ConversionError, match=r"variables\['params'\]"):
    export_hf_t5(cfg, {'params': params}, tmp_path / 'x')
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Parity with transformers' PyTorch T5 (f32, eval mode)

HF_CONFIGS = {
    # T5 1.0: relu, tied + rescaled output; d_kv != d_model / num_heads, non-default buckets.
    '1.0': dict(vocab_size=300, d_model=32, d_kv=12, d_ff=48, num_layers=3, num_decoder_layers=2,
                num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                feed_forward_proj='relu', tie_word_embeddings=True, dropout_rate=0.1),
    # T5 1.1: gated-gelu, separate lm_head, no rescale.
    '1.1': dict(vocab_size=300, d_model=32, d_kv=12, d_ff=40, num_layers=2, num_decoder_layers=3,
                num_heads=3, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                dropout_rate=0.1, layer_norm_epsilon=1e-5),
}


def _hf_model(kind, untie):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(decoder_start_token_id=0, **HF_CONFIGS[kind])
  model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:   # HF initialises norms to 1, which would hide a norm mix-up
        p.uniform_(0.5, 1.5)
    if untie:  # transformers 5.x ties lm_head even when tie_word_embeddings=False
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
  return model


def _inputs(vocab, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(3, 13)).astype(np.int32)
  for row, length in enumerate([13, 9, 5]):   # right padding (id 0) in the encoder
    enc[row, length:] = 0
  dec = rng.integers(1, vocab, size=(3, 7)).astype(np.int32)
  dec[:, 0] = 0                                # decoder start id
  return enc, dec


def _hf_logits(model, enc, dec):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc, dtype=torch.long),
                attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(dec, dtype=torch.long))
  return out.logits.numpy()


@functools.lru_cache(maxsize=None)
def _compiled(cfg, method):
  """One jitted function per (shapes of cfg, method), shared by tests: compiles dominate."""
  module = build_model(cfg)
  return jax.jit(lambda p, *args: module.apply({'params': p}, *args, method=method))


def _our_logits(cfg, params, enc, dec):
  return np.asarray(_compiled(cfg.replace(name='x'), '__call__')(params, enc, dec))


@pytest.mark.parity
@pytest.mark.parametrize('kind,untie', [('1.0', False), ('1.1', True), ('1.1', False)],
                         ids=['1.0', '1.1', '1.1-hf5-tied-unscaled'])
def test_import_matches_transformers(tmp_path, kind, untie):
  model = _hf_model(kind, untie)
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  cfg, params = import_hf_t5(tmp_path / 'hf')
  assert cfg.tie_embeddings == (kind == '1.0')
  assert cfg.head_dim == 12 and cfg.head_dim * cfg.num_heads != cfg.d_model
  enc, dec = _inputs(cfg.vocab_size)
  ours, theirs = _our_logits(cfg, params, enc, dec), _hf_logits(model, enc, dec)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f'HF -> t5like {kind} untie={untie}: max |logit diff| = {diff:.2e}')
  assert ours.shape == theirs.shape == (3, 7, 300)
  assert diff < ATOL


def _our_model(kind):
  """Our config of the same shapes as HF_CONFIGS[kind] (so compiled functions are shared)."""
  hf = HF_CONFIGS[kind]
  cfg = config_from_hf(dict(hf, decoder_start_token_id=0), name='x')
  return cfg, _random_params(cfg, seed=3)


@pytest.mark.parity
@pytest.mark.parametrize('kind', ['1.0', '1.1'])
def test_export_loads_in_transformers(tmp_path, kind):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg, params = _our_model(kind)
  export_hf_t5(cfg, params, tmp_path / 'ours')
  model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'ours').eval()
  assert model.dtype == torch.float32
  tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  assert tied == cfg.tie_embeddings
  enc, dec = _inputs(cfg.vocab_size, seed=1)
  ours, theirs = _our_logits(cfg, params, enc, dec), _hf_logits(model, enc, dec)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f't5like -> HF {kind}: max |logit diff| = {diff:.2e}')
  assert diff < ATOL


@pytest.mark.parity
@pytest.mark.parametrize('kind', ['1.0', '1.1'])
def test_cached_greedy_decoding_matches_generate(tmp_path, kind):
  import torch
  model = _hf_model(kind, untie=kind == '1.1')
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  cfg, params = import_hf_t5(tmp_path / 'hf')
  enc, _ = _inputs(cfg.vocab_size, seed=2)
  k = 6
  # use_cache=False: transformers 5.24's generate sizes its KV cache by the encoder's num_layers
  # and fails (IndexError) when num_decoder_layers > num_layers, as in the 1.1 config here.
  with torch.no_grad():
    out = model.generate(use_cache=False, input_ids=torch.tensor(enc, dtype=torch.long),
                         attention_mask=torch.tensor(enc != 0, dtype=torch.long),
                         do_sample=False, num_beams=1, max_new_tokens=k, min_new_tokens=k,
                         return_dict_in_generate=True, output_logits=True)
  hf_tokens = out.sequences.numpy()[:, 1:]
  hf_step_logits = np.stack([l.numpy() for l in out.logits], axis=1)

  # Ours: prefill + one-token steps from the KV cache; EOS suppressed as min_new_tokens does.
  B, S = enc.shape
  cache = _compiled(cfg.replace(name='x'), 'prefill')(params, enc, init_cache(cfg, B, k, S))
  step = _compiled(cfg.replace(name='x'), 'decode_step')
  tok = np.full((B, 1), cfg.decoder_start_id, np.int32)
  tokens, step_logits = [], []
  for _ in range(k):
    logits, cache = step(params, tok, cache)
    logits = np.asarray(logits[:, 0])
    step_logits.append(logits)
    masked = logits.copy()
    masked[:, cfg.eos_id] = -np.inf
    tok = masked.argmax(-1).astype(np.int32)[:, None]
    tokens.append(tok[:, 0])
  np.testing.assert_array_equal(np.stack(tokens, axis=1), hf_tokens)
  diff = float(np.max(np.abs(np.stack(step_logits, axis=1) - hf_step_logits)))
  print(f'cached greedy {kind}: tokens equal, max |step logit diff| = {diff:.2e}')
  assert diff < ATOL
