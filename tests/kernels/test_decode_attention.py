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


def test_wanted_only_inside_enabled_for_one_float32_query():
  q, k, v = jnp.zeros((2, 1, 4, 8)), jnp.zeros((2, 4, 8, 5)), jnp.zeros((2, 4, 5, 8))
  assert not decode_attention.wanted(q, k, v)
  with library.enabled():
    assert decode_attention.wanted(q, k, v) == library.available()
    assert not decode_attention.wanted(jnp.zeros((2, 3, 4, 8)), k, v)
    assert not decode_attention.wanted(q.astype(jnp.bfloat16), k, v)
