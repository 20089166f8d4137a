"""Building blocks: T5 LayerNorm, einsum projections, embeddings, the FFN; their init and dtypes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.models.layers import MLP, REMAT_POLICIES, Einsum, Embed, RMSNorm

# Compiling dominates tiny tests; LLVM's cheapest level halves XLA's CPU compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})

CFG = get_variant('t5_tiny')
D, F = CFG.d_model, CFG.d_ff


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.RandomState(seed).normal(1.0, 2.0, shape), dtype)


def _init_apply(module, *args):
  """Real initialisation (boxed, with logical names) and one application, both jitted."""
  boxed = jit(module.init)(jax.random.key(0), *args)['params']
  params = nn.unbox(boxed)
  return boxed, params, jit(lambda p, *a: module.apply({'params': p}, *a))(params, *args)


@pytest.mark.parametrize('precision', ['f32', 'bf16'])
def test_rms_norm(precision):
  """T5 LayerNorm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, f32 statistics."""
  cfg = CFG.replace(precision=precision)
  compute = jnp.float32 if precision == 'f32' else jnp.bfloat16
  x = _x((2, 3, D), dtype=compute)     # mean 1: a norm that subtracted it would differ
  boxed, params, y = _init_apply(RMSNorm(cfg), x)
  assert boxed['scale'].names == ('embed',)
  assert params['scale'].dtype == jnp.float32 and bool(jnp.all(params['scale'] == 1.0))
  assert y.dtype == compute
  x64 = np.asarray(x, np.float64)
  ref = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + cfg.layer_norm_epsilon)
  tol = 1e-5 if precision == 'f32' else 1e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol)
  centred = (x64 - x64.mean(-1, keepdims=True))
  centred /= np.sqrt(np.mean(centred ** 2, -1, keepdims=True))
  assert np.max(np.abs(np.asarray(y, np.float64) - centred)) > 0.1


@pytest.mark.parametrize('precision', ['f32', 'bf16'])
def test_einsum_projection_dtypes_and_init(precision):
  cfg = CFG.replace(precision=precision)
  compute = jnp.float32 if precision == 'f32' else jnp.bfloat16
  std = 0.05
  module = Einsum(cfg, 'BTD,DNH->BTNH', (D, 4, 16), ('embed', 'heads', 'kv'), std)
  x = _x((2, 3, D))
  boxed, params, y = _init_apply(module, x)
  assert boxed['kernel'].names == ('embed', 'heads', 'kv')
  kernel = params['kernel']
  assert kernel.shape == (D, 4, 16) and kernel.dtype == jnp.float32   # master weights stay f32
  assert float(jnp.std(kernel)) == pytest.approx(std, rel=0.1)
  assert y.shape == (2, 3, 4, 16) and y.dtype == compute
  ref = np.einsum('btd,dnh->btnh', np.asarray(x, np.float64), np.asarray(kernel, np.float64))
  tol = 1e-4 if precision == 'f32' else 5e-2
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol)
  # out_f32: the logits projection accumulates and returns float32 under bf16 compute.
  logits = Einsum(cfg, 'BTD,DV->BTV', (D, 10), ('embed', 'vocab'), std, out_f32=True)
  assert jax.eval_shape(lambda: logits.init_with_output(jax.random.key(0), x)[0]).dtype == jnp.float32


@pytest.mark.parametrize('name', ['t5_tiny', 't5_1_1_tiny'])
def test_mlp(name):
  """relu: wo(relu(wi x)); gated-gelu: wo(gelu_tanh(wi_0 x) * wi_1 x); T5's init scales."""
  cfg = get_variant(name)
  x = _x((2, 3, D))
  boxed, params, y = _init_apply(MLP(cfg), x, True)
  gated = cfg.ffn_activation == 'gated-gelu'
  assert sorted(params) == (['wi_0', 'wi_1', 'wo'] if gated else ['wi', 'wo'])
  for k, v in boxed.items():
    assert v['kernel'].names == (('mlp', 'embed') if k == 'wo' else ('embed', 'mlp'))
  w = {k: np.asarray(v['kernel'], np.float64) for k, v in params.items()}
  assert np.std(w['wo']) == pytest.approx(F ** -0.5, rel=0.1)
  assert np.std(w['wi_0' if gated else 'wi']) == pytest.approx(D ** -0.5, rel=0.1)
  x64 = np.asarray(x, np.float64)
  if gated:
    a = x64 @ w['wi_0']
    gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    h = gelu * (x64 @ w['wi_1'])
  else:
    h = np.maximum(x64 @ w['wi'], 0)
  np.testing.assert_allclose(np.asarray(y, np.float64), h @ w['wo'], rtol=1e-4, atol=1e-4)


def test_embed_lookup_and_tied_logits():
  cfg = CFG.replace(precision='bf16')
  ids = jnp.asarray([[0, 5, 511]])
  embed = Embed(cfg)
  boxed = jit(embed.init)(jax.random.key(0), ids)['params']
  assert boxed['embedding'].names == ('vocab', 'embed')
  table = nn.unbox(boxed)['embedding']
  assert table.shape == (cfg.vocab_size, D) and table.dtype == jnp.float32
  assert float(jnp.std(table)) == pytest.approx(1.0, rel=0.05)
  apply = jit(lambda p, i: (embed.apply({'params': p}, i),
                            embed.apply({'params': p}, embed.apply({'params': p}, i),
                                        method='attend')))
  x, logits = apply({'embedding': table}, ids)
  assert x.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert logits.shape == (1, 3, cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(x, np.float32),
                                np.asarray(table[ids[0]].astype(jnp.bfloat16), np.float32)[None])


def test_remat_policies_table():
  assert REMAT_POLICIES['none'] is None
  assert REMAT_POLICIES['full'] is jax.checkpoint_policies.nothing_saveable
  assert REMAT_POLICIES['dots'] is jax.checkpoint_policies.checkpoint_dots
  assert (REMAT_POLICIES['dots_with_no_batch_dims'] is
          jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
