"""The CPU one-query attention kernel (t5like/kernels/decode_attention) against float64."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.kernels import decode_attention, library

needs_kernel = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                  reason='no C++ compiler to build the CPU kernels')


def reference(q, k, v, bias):
  logits = np.einsum('bnh,bnhs->bns', q.astype(np.float64), k) + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bns,bnsh->bnh', p / p.sum(-1, keepdims=True), v)


@needs_kernel
@pytest.mark.parametrize('B,N,H,S', [(1, 8, 64, 65), (8, 8, 64, 128), (3, 4, 16, 7),
                                     (2, 2, 20, 300), (1, 1, 136, 1)])
def test_attention_matches_float64(B, N, H, S):
  rng = np.random.default_rng(B * N + H + S)
  q = rng.standard_normal((B, N, H)).astype(np.float32)
  k = rng.standard_normal((B, N, H, S)).astype(np.float32)
  v = rng.standard_normal((B, N, S, H)).astype(np.float32)
  bias = rng.standard_normal((B, N, S)).astype(np.float32) * 3
  bias[:, :, (S + 1) // 2:] = -1e10     # masked positions, as the model's mask bias
  got = jax.jit(decode_attention.attend)(q, k, v, bias)
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, bias), rtol=2e-5, atol=2e-5)


@needs_kernel
def test_bias_broadcasts_and_large_logits_stay_finite():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 3, 16)).astype(np.float32) * 30   # logits in the hundreds
  k = rng.standard_normal((2, 3, 16, 40)).astype(np.float32)
  v = rng.standard_normal((2, 3, 40, 16)).astype(np.float32)
  bias = rng.standard_normal((1, 3, 40)).astype(np.float32)     # shared by the rows
  got = np.asarray(decode_attention.attend(q, k, v, bias))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, reference(q, k, v, np.broadcast_to(bias, (2, 3, 40))),
                             rtol=1e-4, atol=1e-4)


def test_shape_errors_name_the_problem():
  with pytest.raises(ValueError, match=r'\[B,N,H,S\]'):
    decode_attention.attend(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 5, 4)), jnp.zeros((1, 2, 4, 4)),
                            jnp.zeros((1, 2, 4)))


def test_wanted_for_float32_queries_on_cpu_only(monkeypatch):
  q, k, v = jnp.zeros((2, 1, 4, 8)), jnp.zeros((2, 4, 8, 5)), jnp.zeros((2, 4, 5, 8))
  assert decode_attention.wanted(q, k, v) == library.available()
  assert not decode_attention.wanted(jnp.zeros((2, 3, 4, 8)), k, v)
  assert not decode_attention.wanted(q.astype(jnp.bfloat16), k, v)
  full = jnp.zeros((2, 3, 4, 8))
  assert decode_attention.wanted_prefill(full, full, full) == library.available()
  assert not decode_attention.wanted_prefill(q, q, q)            # one query: a decoding step
  assert not decode_attention.wanted_prefill(full.astype(jnp.bfloat16), full, full)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')     # off the CPU: never
  assert not decode_attention.wanted(q, k, v)
  assert not decode_attention.wanted_prefill(full, full, full)


def cached_reference(q, k_new, v_new, keys, values, bias, index):
  keys, values = keys.copy(), values.copy()
  ctx = np.zeros(q.shape)
  for b, pos in enumerate(index):
    if pos < keys.shape[-1]:
      keys[b, :, :, pos], values[b, :, pos, :] = k_new[b], v_new[b]
    used = min(pos + 1, keys.shape[-1])
    ctx[b] = reference(q[b:b + 1], keys[b:b + 1, ..., :used], values[b:b + 1, :, :used],
                       bias[b:b + 1, :, :used])[0]
  return ctx, keys, values


@needs_kernel
@pytest.mark.parametrize('B,N,H,S', [(8, 8, 64, 65), (3, 4, 16, 40), (2, 2, 20, 300)])
def test_cached_attention_writes_in_place_and_reads_only_up_to_each_row(B, N, H, S):
  rng = np.random.default_rng(S)
  q, k_new, v_new = (rng.standard_normal((B, N, H)).astype(np.float32) for _ in range(3))
  index = rng.integers(0, S, B).astype(np.int32)
  index[0] = S - 1                        # the last position
  if B > 2:
    index[1] = S                          # past the end: the write is dropped
  keys = rng.standard_normal((B, N, H, S)).astype(np.float32)
  values = rng.standard_normal((B, N, S, H)).astype(np.float32)
  bias = rng.standard_normal((B, N, S)).astype(np.float32)
  for b, pos in enumerate(index):        # positions after a row's own are stale and masked:
    keys[b, :, :, pos + 1:] = np.nan      # never read, or the context would be NaN
    values[b, :, pos + 1:] = np.nan
    bias[b, :, pos + 1:] = -1e10
  want = cached_reference(q, k_new, v_new, keys, values, bias, index)
  got = jax.jit(decode_attention.attend_cached)(q, k_new, v_new, keys, values, bias, index)
  np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])
  np.testing.assert_array_equal(np.asarray(got[2]), want[2])


@needs_kernel
def test_cached_attention_updates_a_loop_carried_cache_without_copying_it():
  B, N, H, S = 2, 2, 16, 12
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((B, N, H)), jnp.float32)
  pos_S = jnp.arange(S)

  def run(keys, values):
    def body(i, carry):
      keys, values, acc = carry
      bias = jnp.where(pos_S <= i, 0.0, -1e10)[None, None]
      ctx, keys, values = decode_attention.attend_cached(q * i, q + i, q - i, keys, values, bias,
                                                         jnp.full((B,), i, jnp.int32))
      return keys, values, acc + ctx
    return jax.lax.fori_loop(0, S, body, (keys, values, jnp.zeros((B, N, H))))
  zeros = (jnp.zeros((B, N, H, S)), jnp.zeros((B, N, S, H)))
  run = jax.jit(run, donate_argnums=(0, 1))
  compiled = run.lower(*zeros).compile().as_text()
  # The donated cache is written in place in the loop: no copy of a cache-sized buffer.
  cache_shapes = ('f32[2,2,16,12]', 'f32[2,2,12,16]')
  assert not [line for line in compiled.splitlines()
              if ' copy(' in line and line.split('=')[1].strip().startswith(cache_shapes)]
  keys, values, _ = run(*zeros)
  step = np.arange(S, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(keys), np.asarray(q)[..., None] + step, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(values),
                             np.asarray(q)[:, :, None, :] - step[:, None], rtol=1e-6)


def test_cached_shape_errors_name_the_problem():
  with pytest.raises(ValueError, match=r'new keys'):
    decode_attention.attend_cached(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 5)), jnp.zeros((1, 2, 4)),
                                   jnp.zeros((1, 2, 4, 3)), jnp.zeros((1, 2, 3, 4)),
                                   jnp.zeros((1, 2, 3)), jnp.zeros((1,), jnp.int32))


@needs_kernel
@pytest.mark.parametrize('B,T,S,N,H', [(8, 128, 128, 8, 64), (2, 5, 9, 3, 16), (1, 40, 40, 2, 20)])
def test_prefill_attention_matches_float64(B, T, S, N, H):
  rng = np.random.default_rng(T + S)
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, S, N, H)).astype(np.float32)
  v = rng.standard_normal((B, S, N, H)).astype(np.float32)
  bias = rng.standard_normal((1, N, T, S)).astype(np.float32)   # broadcast over rows
  pad = np.zeros((B, 1, 1, S), np.float32)
  pad[0, ..., S // 2:] = -1e10                                   # row 0 has padding
  got = jax.jit(decode_attention.attend_prefill)(q, k, v, bias + pad)
  full = np.broadcast_to(bias + pad, (B, N, T, S))
  want = np.stack([reference(q[:, t].astype(np.float64), k.transpose(0, 2, 3, 1),
                             v.transpose(0, 2, 1, 3), full[:, :, t]) for t in range(T)], axis=1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_prefill_shape_errors_name_the_problem():
  with pytest.raises(ValueError, match=r'\[B,S,N,H\]'):
    decode_attention.attend_prefill(jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 2, 5)),
                                    jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 2, 3, 3)))
