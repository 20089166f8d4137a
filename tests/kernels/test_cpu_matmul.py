"""The CPU decoding kernel (t5like/kernels/cpu_matmul): packing, the product against float64
references, its use in model projections and decoding, and the fallbacks when it cannot run."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.infer import backend as backend_lib, decode
from t5like.kernels import cpu_matmul
from t5like.models import build_model, init_cache
from t5like.models.random_weights import random_params

# An honest environment condition, not a failure: without a C++ compiler the kernel cannot be
# built, and the library runs on XLA's dots (tested below in a subprocess either way).
needs_kernel = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                  reason='no C++ compiler to build the CPU kernel')


@needs_kernel
def test_kernel_builds_here():
  assert cpu_matmul.available(), cpu_matmul.unavailable_reason()


@pytest.mark.parametrize('shape,dims,transposed', [((64, 96), 1, False), ((4, 16, 64), 2, False),
                                                   ((8, 4, 32), 1, False), ((96, 40), 1, True)])
def test_pack_round_trip_is_exact(shape, dims, transposed):
  w = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  packed = cpu_matmul.pack(w, dims, transposed=transposed)
  assert packed.shape == w.shape and packed.dtype == w.dtype
  np.testing.assert_array_equal(packed.unpacked(), w)
  assert cpu_matmul.pack(packed) is packed
  # Through jit (a pytree with one array leaf).
  np.testing.assert_array_equal(jax.jit(lambda p: p.unpacked())(packed), w)


def test_packed_embedding_rows():
  table = jnp.asarray(np.random.default_rng(1).standard_normal((64, 24)), jnp.float32)
  ids = jnp.array([[0, 31, 32, 63], [5, 5, 40, 1]])
  np.testing.assert_array_equal(cpu_matmul.pack(table, transposed=True).rows(ids), table[ids])
  with pytest.raises(ValueError, match='not transposed'):
    cpu_matmul.pack(table.T).rows(ids)


def test_pack_rejects_ragged_columns():
  with pytest.raises(ValueError, match='multiple of 32'):
    cpu_matmul.pack(jnp.zeros((16, 40)))


@needs_kernel
@pytest.mark.parametrize('M', [1, 2, 3, 5, 8, 9, 16, 17, 32])
@pytest.mark.parametrize('K,N', [(64, 32), (200, 96), (512, 544)])
def test_matmul_matches_float64(M, K, N):
  rng = np.random.default_rng(M * 1000 + K + N)
  x = rng.standard_normal((M, K)).astype(np.float32)
  w = rng.standard_normal((K, N)).astype(np.float32)
  got = jax.jit(cpu_matmul.matmul)(jnp.asarray(x), cpu_matmul.pack(jnp.asarray(w)))
  want = x.astype(np.float64) @ w.astype(np.float64)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@needs_kernel
def test_matmul_transposed_weight_and_leading_dims():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 3, 48)).astype(np.float32)
  table = rng.standard_normal((160, 48)).astype(np.float32)        # [N, K], like an embedding
  got = cpu_matmul.matmul(jnp.asarray(x), cpu_matmul.pack(jnp.asarray(table), transposed=True))
  assert got.shape == (2, 3, 160)
  np.testing.assert_allclose(got, x @ table.T, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_fused_matmul_of_several_weights():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((5, 64)).astype(np.float32)
  ws = [rng.standard_normal((64, n)).astype(np.float32) for n in (32, 160, 64)]
  outs = jax.jit(cpu_matmul.matmul_fused)(jnp.asarray(x), [cpu_matmul.pack(jnp.asarray(w))
                                                           for w in ws])
  for got, w in zip(outs, ws):
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_matmul_errors_name_the_problem():
  w = cpu_matmul.pack(jnp.zeros((64, 32)))
  with pytest.raises(ValueError, match='K=64'):
    cpu_matmul.matmul(jnp.zeros((1, 63)), w)
  with pytest.raises(ValueError, match='33 rows'):
    cpu_matmul.matmul(jnp.zeros((33, 64)), w)


def test_wanted_for_packed_float32_few_rows_on_cpu_only(monkeypatch):
  w = cpu_matmul.pack(jnp.zeros((64, 32)))
  x = jnp.zeros((4, 64))
  assert not cpu_matmul.wanted(x, jnp.zeros((64, 32)))     # not packed
  assert cpu_matmul.wanted(x, w) == cpu_matmul.available()
  assert not cpu_matmul.wanted(jnp.zeros((33, 64)), w)
  assert not cpu_matmul.wanted(x.astype(jnp.bfloat16), w)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # off the CPU: never
  assert not cpu_matmul.wanted(x, w)


@needs_kernel
@pytest.mark.parametrize('name', ['t5_tiny', 't5_1_1_tiny', 'decoder_tiny'])
def test_packed_step_logits_equal_unpacked(name):
  cfg = get_variant(name)
  params = random_params(cfg, std=0.2)
  packed = decode.prepare_params(cfg, params, backend='cpu_kernels')
  plain = decode.prepare_params(cfg, params, backend='xla')
  n_packed = sum(isinstance(x, cpu_matmul.PackedKernel) for x in
                 jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, cpu_matmul.PackedKernel)))
  # Per decoder layer: self q/k/v/out, cross q/out, the FFN; plus the output layer.
  ffn = 3 if cfg.ffn_activation in ('gated-gelu', 'swiglu') else 2
  per_layer = 4 + (2 if cfg.is_encdec else 0) + ffn
  assert n_packed == cfg.num_decoder_layers * per_layer + 1
  model = build_model(cfg)
  B = 9   # B * heads > MAX_ROWS: the output projection must count rows, not rows x heads
  tok = jnp.arange(4, 4 + B, dtype=jnp.int32)[:, None]
  cache = init_cache(cfg, B, 8, 5) if cfg.is_encdec else init_cache(cfg, B, 8)
  if cfg.is_encdec:
    enc = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (B, 5)), jnp.int32)
    cache = model.apply({'params': params}, enc, cache, method='prefill')

  def step(p):
    with backend_lib.CPU_KERNELS.attached():
      return model.apply({'params': p}, tok, cache, method='decode_step')[0]
  hlo = jax.jit(step).lower(packed).as_text()
  # Every packed projection runs as the kernel (none falls back to unpacking): q/k/v in one call,
  # and the gated FFN's two input projections in one. So does every attention: self-attention with
  # its cache write, and cross-attention for an encoder-decoder.
  calls = hlo.count('@t5like_matmul_packed(')
  operands = re.findall(r'@t5like_matmul_packed\(([^)]*)\)', hlo)
  assert sum(len(o.split(',')) - 1 for o in operands) == n_packed   # weights: operands but x
  fused_away = 2 + (1 if ffn == 3 else 0)
  assert calls == n_packed - cfg.num_decoder_layers * fused_away
  assert hlo.count('@t5like_decode_attention_cached(') == cfg.num_decoder_layers
  assert hlo.count('@t5like_decode_attention(') == (cfg.num_decoder_layers if cfg.is_encdec else 0)
  np.testing.assert_allclose(jax.jit(step)(packed), jax.jit(step)(plain), rtol=1e-4, atol=1e-4)
  # Against XLA's ops alone (no kernel at all), logits and the updated cache.
  def xla_step(p):
    with backend_lib.XLA.attached():
      return model.apply({'params': p}, tok, cache, method='decode_step')

  def kernel_step(p):
    with backend_lib.CPU_KERNELS.attached():
      return model.apply({'params': p}, tok, cache, method='decode_step')
  want_logits, want_cache = jax.jit(xla_step)(plain)
  got_logits, got_cache = jax.jit(kernel_step)(packed)
  assert '_cached(' not in jax.jit(xla_step).lower(plain).as_text()
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
  for name in want_cache:
    np.testing.assert_allclose(np.asarray(got_cache[name]), np.asarray(want_cache[name]),
                               rtol=1e-5, atol=1e-5, err_msg=name)
  # The XLA backend unpacks a packed weight.
  np.testing.assert_allclose(jax.jit(xla_step)(backend_lib.XLA.layout(cfg, packed))[0],
                             want_logits, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize('name', ['t5_tiny', 't5_1_1_tiny', 'decoder_tiny'])
def test_packed_decoding_equals_xla_decoding(name):
  cfg = get_variant(name)
  params = random_params(cfg, embed_std=0.3, std=0.2)
  packed = decode.prepare_params(cfg, params, backend='cpu_kernels')
  plain = decode.prepare_params(cfg, params, backend='xla')
  inputs = jnp.asarray(np.random.default_rng(2).integers(2, cfg.vocab_size, (4, 7)), jnp.int32)
  a = decode.greedy(packed, cfg, inputs, 6, stop_at_eos=False, backend='cpu_kernels')
  b = decode.greedy(plain, cfg, inputs, 6, stop_at_eos=False, backend='xla')
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
  if name == 't5_tiny':   # sampling runs greedy's loop; beam search has its own
    a = decode.beam_search(packed, cfg, inputs, 6, num_beams=3, stop_at_eos=False,
                           backend='cpu_kernels')
    b = decode.beam_search(plain, cfg, inputs, 6, num_beams=3, stop_at_eos=False, backend='xla')
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


def test_nothing_packed_for_bf16_or_quantised_models():
  cfg = get_variant('t5_tiny')
  params = random_params(cfg)
  for variant in (cfg.replace(precision='bf16'), cfg.with_quant(weights='int8'),
                  cfg.with_quant(activations='dynamic'), cfg.with_quant(qat='int8')):
    prepared = decode.prepare_params(variant, params)
    assert not any(isinstance(x, cpu_matmul.PackedKernel) for x in jax.tree.leaves(
        prepared, is_leaf=lambda x: isinstance(x, cpu_matmul.PackedKernel)))


def _run_isolated(cases):
  """Runs each (code, env) in its own fresh interpreter, all at once (the kernel's build state is
  per process); returns the finished processes' (stdout, stderr)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  procs = [subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env),
                            cwd=root) for code, env in cases]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


FALLBACK = '''
  import jax
  from t5like.config import get_variant
  from t5like.infer import backend as backend_lib, decode
  from t5like.kernels import cpu_matmul
  from t5like.models import init_params
  assert not cpu_matmul.available()
  print('REASON', cpu_matmul.unavailable_reason())
  cfg = get_variant('t5_tiny')
  prepared = decode.prepare_params(cfg, init_params(cfg, jax.random.key(0)))
  assert not any(isinstance(x, cpu_matmul.PackedKernel) for x in jax.tree.leaves(
      prepared, is_leaf=lambda x: isinstance(x, cpu_matmul.PackedKernel)))
  out = decode.greedy(prepared, cfg, jax.numpy.ones((1, 4), 'int32'), 3)
  print('DECODED', out.tokens.shape)
'''


def test_disabled_or_failed_build_falls_back_to_xla(tmp_path):
  (off_out, _), (bad_out, bad_err) = _run_isolated([
      (FALLBACK, {'T5LIKE_CPU_KERNELS': '0'}),
      (FALLBACK, {'CXX': '/bin/false', 'T5LIKE_KERNEL_CACHE': str(tmp_path)})])
  assert 'T5LIKE_CPU_KERNELS=0' in off_out and 'DECODED (1, 3)' in off_out
  assert 'failed on cpu_matmul.cc cpu_matmul_q.cc decode_attention.cc token_pick.cc' in bad_out
  assert 'DECODED (1, 3)' in bad_out
  assert 'kernels unavailable' in bad_err             # the warning says what happened
  assert not list(tmp_path.glob('*.so'))              # nothing half-built left behind


@needs_kernel
@pytest.mark.parametrize('name', ['t5_tiny', 't5_1_1_tiny'])
def test_encoder_prefill_attention_kernel_equals_xla(name):
  cfg = get_variant(name)
  params = decode.prepare_params(cfg, random_params(cfg, std=0.2), backend='cpu_kernels')
  model = build_model(cfg)
  rng = np.random.default_rng(1)
  enc = jnp.asarray(rng.integers(2, cfg.vocab_size, (3, 11)), jnp.int32).at[1, 7:].set(0)
  cache = backend_lib.decoding_cache(init_cache(cfg, 3, 4, 11))

  def prefill(on):
    be = backend_lib.CPU_KERNELS if on else backend_lib.XLA

    def f(p):
      with be.attached():
        return model.apply({'params': be.layout(cfg, p)}, enc, cache, method='prefill')
    return f
  hlo = jax.jit(prefill(True)).lower(params).as_text()
  assert hlo.count('@t5like_prefill_attention(') == cfg.num_encoder_layers
  assert '@t5like_prefill_attention(' not in jax.jit(prefill(False)).lower(params).as_text()
  got, want = jax.jit(prefill(True))(params), jax.jit(prefill(False))(params)
  for key in ('cross_k', 'cross_v'):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-4, atol=1e-4)
