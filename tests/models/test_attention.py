"""Attention pieces: T5's relative-position buckets, the bias table, RoPE, masks, the KV cache."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.models.attention import (NEG_INF, Attention, RelativePositionBias, mask_to_bias,
                                     relative_position_bucket, rope, write_cache)

# Compiling dominates tiny tests; LLVM's cheapest level halves XLA's CPU compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def mesh_tf_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32,
                                     max_distance=128):
  """A pure-Python transcription of Mesh TensorFlow's `_relative_position_bucket`
  (mesh_tensorflow/transformer/transformer_layers.py), for one int."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (1 if n < 0 else 0) * num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  # now n is in the range [0, inf)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  if is_small:
    return ret + n
  val_if_large = max_exact + int(
      math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  val_if_large = min(val_if_large, num_buckets - 1)
  return ret + val_if_large


DISTANCES = np.arange(-300, 301)   # past max_distance on both sides
bucket_jit = jit(relative_position_bucket, static_argnums=(1, 2, 3))


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 64)])
def test_relative_position_bucket_matches_mesh_tf(bidirectional, num_buckets, max_distance):
  ours = np.asarray(bucket_jit(DISTANCES, bidirectional, num_buckets, max_distance))
  ref = np.array([mesh_tf_relative_position_bucket(int(d), bidirectional, num_buckets,
                                                   max_distance) for d in DISTANCES])
  np.testing.assert_array_equal(ours, ref)
  assert ours.min() == 0 and ours.max() == num_buckets - 1   # every bucket in range, all used


def test_relative_position_bucket_known_values():
  # relative position = key position - query position
  tables = {b: np.asarray(bucket_jit(DISTANCES, b, 32, 128)) for b in (True, False)}
  bi = lambda d: int(tables[True][d + 300])
  causal = lambda d: int(tables[False][d + 300])
  assert [bi(d) for d in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]   # exact below 8 each way
  assert bi(-300) == bi(-128) == 15 and bi(300) == bi(128) == 31   # clipped at max_distance
  assert [causal(d) for d in (1, 5, 200)] == [0, 0, 0]               # future keys: bucket 0
  assert [causal(d) for d in (0, -1, -15)] == [0, 1, 15]             # exact below 16
  assert causal(-16) == 16 and causal(-127) == causal(-300) == 31
  # A 2-D array keeps its shape.
  bucket_2d = jax.eval_shape(lambda d: relative_position_bucket(d, True), jnp.zeros((3, 4), int))
  assert bucket_2d.shape == (3, 4)


@pytest.mark.parametrize('bidirectional', [True, False])
def test_relative_position_bias_is_a_table_lookup(bidirectional):
  cfg = get_variant('t5_tiny')
  module = RelativePositionBias(cfg, bidirectional=bidirectional)
  q_pos = jnp.arange(6)[None] + 3
  k_pos = jnp.arange(9)[None]
  table = jnp.asarray(np.random.RandomState(0).normal(size=(cfg.num_heads, 32)), jnp.float32)
  bias = jit(lambda t, q, k: module.apply({'params': {'rel_embedding': t}}, q, k))(
      table, q_pos, k_pos)
  assert bias.shape == (1, cfg.num_heads, 6, 9) and bias.dtype == jnp.float32
  rel = np.asarray(k_pos)[0][None, :] - np.asarray(q_pos)[0][:, None]
  buckets = np.vectorize(lambda d: mesh_tf_relative_position_bucket(int(d), bidirectional))(rel)
  np.testing.assert_allclose(np.asarray(bias[0]), np.asarray(table)[:, buckets], rtol=1e-6)


def test_mask_to_bias():
  mask = jnp.asarray([[[True, False], [False, False]]])
  bias = mask_to_bias(mask)
  assert bias.shape == (1, 1, 2, 2) and bias.dtype == jnp.float32
  assert bias.tolist() == [[[[0.0, NEG_INF], [NEG_INF, NEG_INF]]]]
  probs = jax.nn.softmax(jnp.zeros((1, 1, 2, 2)) + bias, axis=-1)
  assert bool(jnp.all(jnp.isfinite(probs)))   # a fully masked row stays NaN-free


def test_rope_is_relative_and_norm_preserving():
  H = 16
  q = jnp.asarray(np.random.RandomState(1).normal(size=(1, 1, 1, H)), jnp.float32)
  k = jnp.asarray(np.random.RandomState(2).normal(size=(1, 1, 1, H)), jnp.float32)
  rope_jit = jit(rope, static_argnums=2)
  at = lambda x, p: rope_jit(x, jnp.asarray([[p]]), 10_000.0)[0, 0, 0]
  dot = lambda m, n: float(jnp.dot(at(q, m), at(k, n)))
  assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)
  assert dot(7, 3) != pytest.approx(dot(3, 7), abs=1e-3)
  np.testing.assert_allclose(at(q, 0), q[0, 0, 0], atol=1e-6)        # position 0: identity
  assert float(jnp.linalg.norm(at(q, 33))) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
  assert rope(q.astype(jnp.bfloat16), jnp.zeros((1, 1), jnp.int32), 1e4).dtype == jnp.bfloat16


def test_write_cache_per_row_offsets():
  new_BTNH = jnp.arange(1, 7, dtype=jnp.float32).reshape(3, 2, 1, 1)
  expected = [[1, 2, 0, 0, 0, 0], [0, 0, 0, 3, 4, 0], [0, 0, 0, 0, 5, 6]]
  values = write_cache(jnp.zeros((3, 1, 6, 1)), new_BTNH, jnp.asarray([0, 3, 4]), keys=False)
  assert values[:, 0, :, 0].tolist() == expected                  # [B, N, S, H]
  keys = write_cache(jnp.zeros((3, 1, 1, 6)), new_BTNH, jnp.asarray([0, 3, 4]), keys=True)
  assert keys[:, 0, 0, :].tolist() == expected                    # [B, N, H, S]


def test_attention_is_unscaled_softmax_attention():
  """T5: softmax(q k^T + bias) v with no 1/sqrt(H) factor; masked keys get no weight."""
  cfg = get_variant('t5_tiny')
  B, T, S, D, N, H = 2, 3, 5, cfg.d_model, cfg.num_heads, cfg.head_dim
  x = jnp.asarray(np.random.RandomState(1).normal(size=(B, T, D)), jnp.float32)
  kv_in = jnp.asarray(np.random.RandomState(2).normal(size=(B, S, D)), jnp.float32)
  attn = Attention(cfg)
  mask = jnp.ones((B, T, S), bool).at[1, :, 3:].set(False)
  bias = mask_to_bias(mask)
  abstract = jax.eval_shape(attn.init, jax.random.key(2), x, bias, True, kv_BSD=kv_in)['params']
  assert abstract['query']['kernel'].names == ('embed', 'heads', 'kv')
  rng = np.random.RandomState(0)
  w = {k: rng.normal(0, 0.2, abstract[k]['kernel'].value.shape).astype(np.float32)
       for k in ('query', 'key', 'value', 'out')}
  params = {k: {'kernel': jnp.asarray(v)} for k, v in w.items()}
  out = jit(lambda p, x, b, kv: attn.apply({'params': p}, x, b, True, kv_BSD=kv))(
      params, x, bias, kv_in)
  assert out.shape == (B, T, D)
  x, kv_in, w = np.asarray(x, np.float64), np.asarray(kv_in, np.float64), {
      k: v.astype(np.float64) for k, v in w.items()}
  q = np.einsum('btd,dnh->btnh', x, w['query'])
  k = np.einsum('bsd,dnh->bsnh', kv_in, w['key'])
  v = np.einsum('bsd,dnh->bsnh', kv_in, w['value'])
  logits = np.einsum('btnh,bsnh->bnts', q, k) + np.asarray(bias)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  assert probs[1, :, :, 3:].max() == 0.0
  ref = np.einsum('btnh,nhd->btd', np.einsum('bnts,bsnh->btnh', probs, v), w['out'])
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
