"""Quantised layers: error bounds, int4 packing, integer matmuls, the straight-through estimator."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.models import quant as Q


@pytest.mark.parametrize('scheme,group', [('int8', 128), ('int4', 32), ('int4', 64), ('int4', 128)])
@pytest.mark.parametrize('shape,contract', [((256, 4, 16), 1), ((4, 64, 32), 2)])
def test_quantise_dequantise_error_within_half_a_step(scheme, group, shape, contract):
  w = jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.1, 3.0, shape[-1])
  q, s = Q.quantize_kernel(w, contract, scheme, group)
  C = int(np.prod(shape[:contract]))
  if scheme == 'int8':
    assert q.dtype == jnp.int8 and q.shape == shape and s.shape == shape[contract:]
    step = jnp.broadcast_to(s, shape)
  else:
    assert q.dtype == jnp.uint8 and q.shape == (C // 2,) + shape[contract:]
    assert s.shape == (C // group,) + shape[contract:]
    step = jnp.repeat(s.reshape(C // group, -1), group, axis=0).reshape(shape)
  dq = Q.dequantize_kernel(q, s, shape, contract, scheme)
  err = jnp.abs(dq - w)
  assert bool(jnp.all(err <= 0.5 * step * (1 + 1e-5) + 1e-7))
  assert float(err.max()) > 0  # it is a real quantisation


def test_int4_pack_unpack_round_trip():
  vals = jnp.arange(-8, 8, dtype=jnp.int8)
  q = jnp.stack(jnp.meshgrid(vals, vals, indexing='ij')).reshape(2, 256).T   # all pairs, [256, 2]
  q = jnp.concatenate([q, jax.random.randint(jax.random.key(1), (256, 6), -8, 8).astype(jnp.int8)],
                      axis=1)
  for axis in (0, 1):
    packed = Q.pack_int4(q, axis)
    assert packed.dtype == jnp.uint8
    assert packed.shape[axis] == q.shape[axis] // 2
    np.testing.assert_array_equal(Q.unpack_int4(packed, axis), q)
  # Layout: element 2i in the low nibble, 2i+1 in the high nibble.
  np.testing.assert_array_equal(Q.pack_int4(jnp.array([[-1], [2]], jnp.int8), 0), [[0x2F]])
  with pytest.raises(ValueError, match='odd size'):
    Q.pack_int4(jnp.zeros((3, 2), jnp.int8), 0)


def test_integer_matmuls_equal_dequantised_float_matmul_and_rounding_bound():
  kx, kw = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (8, 256))
  w = jax.random.normal(kw, (256, 48)) * 0.05
  xq, xs = Q.quantize_rows(x)
  assert xq.dtype == jnp.int8 and xs.shape == (8, 1)
  xdq = xq.astype(jnp.float32) * xs
  for scheme, group in (('int8', 0), ('int4', 32), ('int4', 128)):
    q, s = Q.quantize_kernel(w, 1, scheme, group or 128)
    q_CO, s2 = Q._unpacked_2d(q, s, 256, scheme)
    y = (Q.int8_matmul(xq, xs, q_CO, s2) if scheme == 'int8'
         else Q.grouped_int_matmul(xq, xs, q_CO, s2))
    wdq = Q.dequantize_kernel(q, s, w.shape, 1, scheme)
    np.testing.assert_allclose(y, xdq @ wdq, rtol=1e-5, atol=1e-5)
    # Against the float matmul: |x w - x~ w~| <= sum |x| e_w + |w| e_x + e_x e_w per output.
    ex = 0.5 * xs
    ew = jnp.abs(wdq - w).max(axis=0, keepdims=True)
    bound = jnp.abs(x) @ jnp.broadcast_to(ew, w.shape) + ex * jnp.abs(w).sum(0) + ex * ew * 256
    assert bool(jnp.all(jnp.abs(y - x @ w) <= bound + 1e-5))
  # The int8 path really contracts integers with int32 accumulation.
  hlo = jax.jit(lambda a, b: Q.int8_matmul(a, xs, b, s2)).lower(
      xq, Q.quantize_kernel(w, 1, 'int8')[0]).as_text()
  assert 'xi8' in hlo and 'i32' in hlo


def test_ste_gradient_is_identity_and_forward_is_fake_quantised():
  cfg = get_variant('t5_tiny', quant={'qat': 'int4', 'group_size': 32})
  w = jax.random.normal(jax.random.key(3), (64, 4, 16))
  g = jax.random.normal(jax.random.key(4), w.shape)
  fq = Q.fake_quant_kernel(w, cfg, 1)
  q, s = Q.quantize_kernel(w, 1, 'int4', 32)
  np.testing.assert_allclose(fq, Q.dequantize_kernel(q, s, w.shape, 1, 'int4'), atol=1e-6)
  grad = jax.grad(lambda k: jnp.sum(Q.fake_quant_kernel(k, cfg, 1) * g))(w)
  np.testing.assert_allclose(grad, g, rtol=0, atol=0)
  table = jax.random.normal(jax.random.key(5), (512, 64))
  cfg8 = cfg.with_quant(qat='int8')
  grad = jax.grad(lambda t: jnp.sum(Q.fake_quant_kernel(t, cfg8, 1, channel_axis=0) * table))(table)
  np.testing.assert_array_equal(grad, table)
  err = jnp.abs(Q.fake_quant_kernel(table, cfg8, 1, channel_axis=0) - table)
  assert bool(jnp.all(err <= jnp.abs(table).max(1, keepdims=True) / 127 / 2 + 1e-6))
