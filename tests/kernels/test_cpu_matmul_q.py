"""The int8 / int4 CPU decoding kernel (t5like/kernels/cpu_matmul_q.cc): packing of the stored
layouts of models/quant.py, and the product against the dequantised float32 weight in float64."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.kernels import cpu_matmul
from t5like.models import quant

needs_kernel = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                  reason='no C++ compiler to build the CPU kernel')


def stored(shape, contract_dims, scheme, group=32, seed=0):
  """(qkernel, qscale, dequantised float64 [C, O]) of a random float kernel."""
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  q, s = quant.quantize_kernel(w, contract_dims, scheme, group)
  deq = quant.dequantize_kernel(q, s, shape, contract_dims, scheme)
  C = int(np.prod(shape[:contract_dims]))
  return q, s, np.asarray(deq, np.float64).reshape(C, -1)


def stored_table(V, D, scheme, group=32, seed=0):
  """(qembedding, qscale, dequantised float64 [V, D]) as QuantTable stores a table."""
  table = jnp.asarray(np.random.default_rng(seed).standard_normal((V, D)), jnp.float32)
  q, s = quant.quantize_kernel(table.T, 1, scheme, group)
  deq = quant.dequantize_kernel(q, s, (D, V), 1, scheme).T
  return q.T, s.T, np.asarray(deq, np.float64)


@pytest.mark.parametrize('scheme', ['int8', 'int4'])
@pytest.mark.parametrize('shape,dims', [((64, 96), 1), ((4, 16, 64), 2), ((64, 4, 32), 1)])
def test_pack_round_trip_is_exact(scheme, shape, dims):
  q, s, _ = stored(shape, dims, scheme)
  packed = cpu_matmul.pack_quant(q, s, scheme, dims)
  assert packed.shape == q.shape and packed.dtype == q.dtype
  assert packed.k == int(np.prod(shape[:dims])) and packed.n == int(np.prod(shape[dims:]))
  np.testing.assert_array_equal(packed.unpacked(), q)
  np.testing.assert_array_equal(jax.jit(lambda p: p.unpacked())(packed), q)


@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_packed_table_rows_are_the_stored_rows(scheme):
  q, s, _ = stored_table(96, 64, scheme)
  packed = cpu_matmul.pack_quant(q, s, scheme, transposed=True)
  ids = jnp.array([[0, 31, 32, 95], [5, 5, 64, 1]])
  np.testing.assert_array_equal(packed.stored_rows(ids), q[ids])
  np.testing.assert_array_equal(packed.unpacked(), q)


def test_pack_quant_errors_name_the_problem():
  q, s, _ = stored((64, 40), 1, 'int8')
  with pytest.raises(ValueError, match='multiple of 32'):
    cpu_matmul.pack_quant(q, s, 'int8')
  with pytest.raises(ValueError, match='stored as uint8'):
    cpu_matmul.pack_quant(q, s, 'int4')
  with pytest.raises(ValueError, match="choose one of \\['int8', 'int4'\\]"):
    cpu_matmul.pack_quant(q, s, 'int2')


@needs_kernel
@pytest.mark.parametrize('scheme,group', [('int8', 0), ('int4', 32), ('int4', 64), ('int4', 128)])
@pytest.mark.parametrize('M', [1, 3, 9, 32])
@pytest.mark.parametrize('K,N', [(128, 32), (256, 96), (512, 544)])
def test_matmul_equals_dequantised_float64(scheme, group, M, K, N):
  rng = np.random.default_rng(M * 1000 + K + N + group)
  q, s, w = stored((K, N), 1, scheme, group or 32, seed=K + N)
  x = rng.standard_normal((M, K)).astype(np.float32)
  packed = cpu_matmul.pack_quant(q, s, scheme)
  got = jax.jit(cpu_matmul.matmul_quant)(jnp.asarray(x), packed)
  np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ w, rtol=1e-5,
                             atol=1e-5 * np.sqrt(K))


@needs_kernel
@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_matmul_multi_dim_contraction_and_table(scheme):
  rng = np.random.default_rng(7)
  q, s, w = stored((4, 16, 64), 2, scheme)             # an attention output projection [N, H, D]
  x = rng.standard_normal((2, 3, 64)).astype(np.float32)
  got = cpu_matmul.matmul_quant(jnp.asarray(x), cpu_matmul.pack_quant(q, s, scheme, 2))
  np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-4)
  qt, st, table = stored_table(160, 64, scheme)        # a tied output layer x @ E^T
  got = cpu_matmul.matmul_quant(jnp.asarray(x), cpu_matmul.pack_quant(qt, st, scheme,
                                                                       transposed=True))
  assert got.shape == (2, 3, 160)
  np.testing.assert_allclose(got, x @ table.T, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_fused_quant_matmul_of_several_weights(scheme):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((5, 64)).astype(np.float32)
  weights = [stored((64, n), 1, scheme, seed=n) for n in (32, 160, 64)]
  outs = jax.jit(cpu_matmul.matmul_quant_fused)(
      jnp.asarray(x), [cpu_matmul.pack_quant(q, s, scheme) for q, s, _ in weights])
  for got, (_, _, w) in zip(outs, weights):
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_quant_matmul_errors_name_the_problem():
  q8, s8, _ = stored((64, 32), 1, 'int8')
  q4, s4, _ = stored((64, 32), 1, 'int4')
  w8, w4 = cpu_matmul.pack_quant(q8, s8, 'int8'), cpu_matmul.pack_quant(q4, s4, 'int4')
  with pytest.raises(ValueError, match='K=64'):
    cpu_matmul.matmul_quant(jnp.zeros((1, 63)), w8)
  with pytest.raises(ValueError, match='33 rows'):
    cpu_matmul.matmul_quant(jnp.zeros((33, 64)), w4)
  with pytest.raises(ValueError, match='share a scheme'):
    cpu_matmul.matmul_quant_fused(jnp.zeros((1, 64)), [w8, w4])
  assert cpu_matmul.quant_wanted(jnp.zeros((4, 64)), w8) == cpu_matmul.available()
  assert not cpu_matmul.quant_wanted(jnp.zeros((33, 64)), w8)
  assert not cpu_matmul.quant_wanted(jnp.zeros((4, 64)), q8)
