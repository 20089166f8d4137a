"""ONNX export (t5like.infer.onnx) and ONNX Runtime greedy decoding (t5like.ort) against
t5like's own decoding: same tokens and f32 logits per architecture, the manifest's round trip and
its checks, the exporter's errors, int8, and the bundle CLI."""
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from t5like import ort
from t5like.config import get_variant
from t5like.infer import decode
from t5like.infer import onnx as t5onnx
from t5like.models import build_model
from t5like.infer.backend import split_layers
from t5like.models.random_weights import random_params
from t5like.serve import bundle

B, T = 3, 8
ARCHS = ['t5_tiny', 't5_1_1_tiny', 'decoder_tiny']


def fixture_inputs(cfg):
  rng = np.random.RandomState(1)
  if cfg.is_encdec:   # sources of lengths 10, 7, 10
    inputs = rng.randint(2, cfg.vocab_size, (B, 10))
    inputs[1, 7:] = 0
  else:               # right-padded prompts of lengths 5, 3, 4
    inputs = rng.randint(2, cfg.vocab_size, (B, 5))
    inputs[1, 3:] = 0
    inputs[2, 4:] = 0
  return inputs


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """name -> (cfg, params, inputs, export folder, OrtModel, t5like greedy tokens)."""
  out = {}
  for name in ARCHS:
    cfg = get_variant(name)
    # Spread enough that greedy outputs vary between prompts (checked below).
    params = random_params(cfg, embed_std=0.3, std=0.2)
    inputs = fixture_inputs(cfg)
    folder = str(tmp_path_factory.mktemp(name))
    t5onnx.export_onnx(cfg, params, folder)
    ref = decode.greedy(params, cfg, jnp.asarray(inputs, jnp.int32), T, stop_at_eos=False)
    out[name] = (cfg, params, inputs, folder, ort.OrtModel(folder), np.asarray(ref.tokens))
  return out


def reference_logits(cfg, params, inputs, tokens):
  """t5like's logits [B, T, V] for each greedy token, from one teacher-forced full forward."""
  model = build_model(cfg)
  forward = jax.jit(lambda p, *a: model.apply({'params': p}, *a),
                    compiler_options={'xla_backend_optimization_level': 0})
  if cfg.is_encdec:
    dec = np.concatenate([np.full((B, 1), cfg.decoder_start_id), tokens[:, :-1]], axis=1)
    return np.asarray(forward(params, jnp.asarray(inputs, jnp.int32), jnp.asarray(dec, jnp.int32)))
  lengths = ort.prompt_lengths(inputs)
  seq = np.zeros((B, inputs.shape[1] + T), np.int64)   # prompt + tokens, right-padded
  for r, n in enumerate(lengths):
    seq[r, :n], seq[r, n:n + T] = inputs[r, :n], tokens[r]
  logits = np.asarray(forward(params, jnp.asarray(seq, jnp.int32)))
  return np.stack([logits[r, n - 1:n - 1 + T] for r, n in enumerate(lengths)])


@pytest.mark.parametrize('name', ARCHS)
def test_onnx_runtime_greedy_matches_t5like(exported, name):
  cfg, params, inputs, _, model, ref_tokens = exported[name]
  assert len({tuple(r) for r in ref_tokens}) == B, 'fixture: outputs must vary between prompts'
  assert all(len(set(r)) > 1 for r in ref_tokens), 'fixture: outputs must vary along a row'
  tokens, lengths, logits = model.greedy(inputs, T, stop_at_eos=False, return_logits=True)
  np.testing.assert_array_equal(tokens, ref_tokens)
  assert lengths.tolist() == [T] * B
  want = reference_logits(cfg, params, inputs, tokens)
  assert logits.shape == want.shape == (B, T, cfg.vocab_size)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_rows_stop_at_their_own_eos(exported):
  cfg, params, inputs, _, model, _ = exported['t5_tiny']
  ref = decode.greedy(params, cfg, jnp.asarray(inputs, jnp.int32), T)
  assert (np.asarray(ref.lengths) < T).any(), 'fixture: some row must emit EOS'
  tokens, lengths = model.greedy(inputs, T)
  np.testing.assert_array_equal(tokens, np.asarray(ref.tokens))
  np.testing.assert_array_equal(lengths, np.asarray(ref.lengths))


def test_example_runs_without_jax(exported):
  """The ONNX Runtime example (python -m t5like.ort) imports no jax and decodes the same tokens."""
  cfg, _, inputs, folder, _, ref_tokens = exported['decoder_tiny']
  ids = [','.join(str(t) for t in row[:n]) for row, n in zip(inputs, ort.prompt_lengths(inputs))]
  argv = ['t5like.ort', f'--model={folder}', f'--max_new_tokens={T}'] + [f'--ids={s}' for s in ids]
  code = ('import runpy, sys; sys.argv = %r; runpy.run_module("t5like.ort", run_name="__main__");'
          'assert "jax" not in sys.modules, sorted(m for m in sys.modules if "jax" in m)' % argv)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert out.returncode == 0, out.stderr[-2000:]
  got = [[int(t) for t in line.split(',')] for line in out.stdout.strip().splitlines()]
  # Rows stop at EOS there; compare each up to its length.
  assert got == [list(r[:len(g)]) for r, g in zip(ref_tokens, got)] and len(got) == B


def test_manifest_round_trip(exported):
  cfg, _, _, folder, model, _ = exported['t5_1_1_tiny']
  m = ort.read_manifest(folder)
  assert m == model.manifest
  assert (m['architecture'], m['vocab_size'], m['eos_id'], m['decoder_start_id'], m['opset']) == (
      'encdec', cfg.vocab_size, cfg.eos_id, cfg.decoder_start_id, 17)
  assert m['graphs']['decoder']['inputs']['past_key_0'] == {
      'dtype': 'float32', 'shape': ['batch', cfg.num_heads, cfg.head_dim, 'cache']}
  for graph, session in model.sessions.items():
    assert m['graphs'][graph]['inputs'] == ort.io_spec(session.get_inputs())
    assert m['graphs'][graph]['outputs'] == ort.io_spec(session.get_outputs())


def _broken_copy(tmp_path, folder, edit):
  dst = tmp_path / 'broken'
  shutil.copytree(folder, dst)
  m = json.loads((dst / ort.MANIFEST_FILE).read_text())
  edit(m)
  (dst / ort.MANIFEST_FILE).write_text(json.dumps(m))
  return str(dst)


@pytest.mark.parametrize('edit,message', [
    (lambda m: m.update(vocab_size=m['vocab_size'] + 1), 'vocab_size'),
    (lambda m: m.update(num_layers=3), 'num_layers=3'),
    (lambda m: m['graphs']['decoder']['inputs']['cache_index'].update(dtype='int32'),
     "'cache_index' has dtype int64 in the graph but int32"),
    (lambda m: m['graphs']['encoder']['outputs']['cross_key_0'].update(shape=['batch', 4, 16, 9]),
     "'cross_key_0' has shape"),
    (lambda m: m['graphs']['decoder']['inputs'].pop('encoder_attention_mask'),
     'encoder_attention_mask'),
    (lambda m: m.pop('eos_id'), "lacks ['eos_id']"),
    (lambda m: m['graphs']['encoder'].update(file='missing.onnx'),
     "'missing.onnx', which is missing"),
])
def test_bad_manifest_is_refused(exported, tmp_path, edit, message):
  folder = _broken_copy(tmp_path, exported['t5_tiny'][3], edit)
  with pytest.raises(ort.ManifestError, match=message.replace('[', r'\[').replace(']', r'\]')):
    ort.OrtModel(folder)


@pytest.mark.parametrize('field,value,op', [
    ('weights', 'int8', 'quantised einsum'),
    ('activations', 'dynamic', 'activation quantisation'),
    ('qat', 'int8', 'fake-quantised kernels'),
])
def test_unexpressible_configs_name_the_field(tmp_path, field, value, op):
  cfg = get_variant('t5_tiny').with_quant(**{field: value})
  with pytest.raises(t5onnx.OnnxExportError, match=rf'{op}.*model\.quant\.{field}={value!r}'):
    t5onnx.export_onnx(cfg, {}, str(tmp_path))


def test_wrong_params_are_refused(exported, tmp_path):
  cfg, params, *_ = exported['t5_tiny']
  with pytest.raises(t5onnx.OnnxExportError, match='do not match model'):
    t5onnx.export_onnx(cfg.replace(d_ff=256), params, str(tmp_path))
  packed = dict(params, shared_embedding={'embedding': object()})
  with pytest.raises(t5onnx.OnnxExportError, match='shared_embedding/embedding is a object'):
    t5onnx.export_onnx(cfg, packed, str(tmp_path))


@pytest.mark.parametrize('name,overrides', [
    ('t5_tiny', dict(shared_layer_groups=1)),                     # one weight set, two layers
    ('decoder_tiny', dict(position='relative', tie_embeddings=True, ffn_activation='swiglu')),
])
def test_other_architectures(tmp_path, name, overrides):
  cfg = get_variant(name, **overrides)
  params = random_params(cfg, embed_std=0.3, std=0.2)
  inputs = fixture_inputs(cfg)
  t5onnx.export_onnx(cfg, split_layers(cfg, params, encoder=True), str(tmp_path))
  ref = np.asarray(decode.greedy(params, cfg, jnp.asarray(inputs, jnp.int32), T,
                                 stop_at_eos=False).tokens)
  assert len({tuple(r) for r in ref}) == B
  np.testing.assert_array_equal(ort.OrtModel(str(tmp_path)).greedy(inputs, T, stop_at_eos=False)[0],
                                ref)


def test_int8_graphs(tmp_path):
  # Milder random weights than the fixture's: its deliberately spread ones amplify any rounding.
  cfg = get_variant('t5_1_1_tiny')
  inputs = fixture_inputs(cfg)
  t5onnx.export_onnx(cfg, random_params(cfg, seed=3, std=0.05), str(tmp_path / 'f32'))
  m = t5onnx.quantize_int8(str(tmp_path / 'f32'), str(tmp_path / 'int8'))
  assert m['quantization'] == 'int8-dynamic-per-channel'
  ops = {n.op_type for n in onnx.load(str(tmp_path / 'int8' / 'decoder.onnx')).graph.node}
  assert {'DynamicQuantizeLinear', 'MatMulInteger'} <= ops
  f32_bytes = t5onnx.graph_bytes(str(tmp_path / 'f32'))
  assert t5onnx.graph_bytes(str(tmp_path / 'int8')) < 0.5 * f32_bytes
  _, _, f_logits = ort.OrtModel(str(tmp_path / 'f32')).greedy(inputs, 2, return_logits=True)
  _, _, q_logits = ort.OrtModel(str(tmp_path / 'int8')).greedy(inputs, 2, return_logits=True)
  # Quantisation moves the first step's logits a little (about 1% here), not arbitrarily.
  err = np.abs(q_logits[:, 0] - f_logits[:, 0]).max() / np.abs(f_logits[:, 0]).max()
  assert 0 < err < 0.05, err


def test_bundle_cli(exported, tmp_path):
  cfg, params, inputs, _, _, ref_tokens = exported['t5_tiny']
  tok = types.SimpleNamespace(vocab_size=cfg.vocab_size, model_proto=b'spm')
  bundle.export_bundle(params, cfg, tok, str(tmp_path / 'bundle'))
  t5onnx.main([f'--bundle={tmp_path / "bundle"}', f'--out={tmp_path / "onnx"}'])
  model = ort.OrtModel(str(tmp_path / 'onnx'))
  assert model.manifest['tokenizer'] == 'tokenizer.model'
  np.testing.assert_array_equal(model.greedy(inputs, T, stop_at_eos=False)[0], ref_tokens)
  with pytest.raises(t5onnx.OnnxExportError, match='is not a model bundle: config.json is missing'):
    t5onnx.main([f'--bundle={tmp_path}', f'--out={tmp_path / "x"}'])
