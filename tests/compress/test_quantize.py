"""Quantisation: error bounds, int4 packing, integer matmuls, STE, quantised models, checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5like.config import ConfigError, get_variant
from t5like.compress import quantize as Q
from t5like.models import transformer


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


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
  cfg = get_variant('t5_tiny', qat='int4', weight_quant_group_size=32)
  w = jax.random.normal(jax.random.key(3), (64, 4, 16))
  g = jax.random.normal(jax.random.key(4), w.shape)
  fq = Q.fake_quant_kernel(w, cfg, 1)
  q, s = Q.quantize_kernel(w, 1, 'int4', 32)
  np.testing.assert_allclose(fq, Q.dequantize_kernel(q, s, w.shape, 1, 'int4'), atol=1e-6)
  grad = jax.grad(lambda k: jnp.sum(Q.fake_quant_kernel(k, cfg, 1) * g))(w)
  np.testing.assert_allclose(grad, g, rtol=0, atol=0)
  table = jax.random.normal(jax.random.key(5), (512, 64))
  cfg8 = cfg.replace(qat='int8')
  grad = jax.grad(lambda t: jnp.sum(Q.fake_quant_kernel(t, cfg8, 1, channel_axis=0) * table))(table)
  np.testing.assert_array_equal(grad, table)
  err = jnp.abs(Q.fake_quant_kernel(table, cfg8, 1, channel_axis=0) - table)
  assert bool(jnp.all(err <= jnp.abs(table).max(1, keepdims=True) / 127 / 2 + 1e-6))


@pytest.fixture(scope='module')
def tiny():
  cfg = get_variant('t5_tiny')
  params = transformer.init_params(cfg, jax.random.key(0))
  tok = jax.random.randint(jax.random.key(1), (2, 12), 2, cfg.vocab_size)
  inputs = (tok, tok[:, ::-1])
  logits = transformer.build_model(cfg).apply({'params': params}, *inputs)
  return cfg, params, inputs, logits


@pytest.mark.parametrize('scheme,act,tol', [('int8', 'none', 0.03), ('int8', 'dynamic', 0.04),
                                            ('int4', 'none', 0.25), ('int4', 'static', 0.3)])
def test_quantised_model_logits_close_to_float(tiny, scheme, act, tol):
  cfg, params, inputs, ref = tiny
  qp, qcfg = Q.quantize_params(params, cfg, scheme, group_size=32, activation_quant=act,
                               calibration_inputs=inputs, scale_dtype='bfloat16')
  assert qcfg.weight_quant == scheme and qcfg.activation_quant == act
  leaf = qp['encoder']['stack']['layers']['layer']['attention']['query']
  assert leaf['qkernel'].dtype == (jnp.int8 if scheme == 'int8' else jnp.uint8)
  assert leaf['qscale'].dtype == jnp.bfloat16 and 'kernel' not in leaf
  assert 'embedding' not in qp['shared_embedding']['quant']
  if act == 'static':
    assert leaf['act_scale'].shape == (cfg.num_encoder_layers,)
  out = transformer.build_model(qcfg).apply({'params': qp}, *inputs)
  assert _rel(out, ref) < tol, _rel(out, ref)


def test_dynamic_activations_with_float_weights_and_qat_model(tiny):
  cfg, params, inputs, ref = tiny
  out = transformer.build_model(cfg.replace(activation_quant='dynamic')).apply(
      {'params': params}, *inputs)
  assert _rel(out, ref) < 0.04
  qat = transformer.build_model(cfg.replace(qat='int8'))
  loss = lambda p: jnp.mean(qat.apply({'params': p}, *inputs) ** 2)
  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads['shared_embedding']['embedding']).sum()) > 0
  assert _rel(qat.apply({'params': params}, *inputs), ref) < 0.03


def test_weight_bytes_of_t5_small_counting_every_matrix():
  cfg = get_variant('t5_small')
  f32 = Q.weight_bytes(transformer.abstract_params(cfg))
  assert f32 == 60_506_624 * 4
  int8 = Q.abstract_quantized_params(cfg, 'int8')
  int4 = Q.abstract_quantized_params(cfg, 'int4', group_size=128)
  assert int8['shared_embedding']['quant']['qembedding'].dtype == jnp.int8
  assert int4['shared_embedding']['quant']['qembedding'].shape == (32128, 256)
  assert Q.weight_bytes(int8) <= 0.27 * f32
  assert Q.weight_bytes(int4) <= 0.15 * f32


def test_qparams_orbax_round_trip_runs_the_same(tiny, tmp_path):
  cfg, params, inputs, _ = tiny
  qp, qcfg = Q.quantize_params(params, cfg, 'int4', group_size=32)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'q', qp)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / 'q', jax.tree.map(ocp.utils.to_shape_dtype_struct, qp))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b) or a.dtype == b.dtype, qp, restored)
  assert jax.tree.map(lambda a: a.dtype, restored) == jax.tree.map(lambda a: a.dtype, qp)
  model = transformer.build_model(qcfg)
  np.testing.assert_array_equal(model.apply({'params': restored}, *inputs),
                                model.apply({'params': qp}, *inputs))


def test_clear_errors(tiny):
  cfg, params, inputs, _ = tiny
  with pytest.raises(ConfigError, match='not a multiple of model.weight_quant_group_size=128'):
    Q.quantize_params(params, cfg, 'int4', group_size=128)
  with pytest.raises(ConfigError, match='calibration_inputs'):
    Q.quantize_params(params, cfg, 'int8', activation_quant='static')
  with pytest.raises(ConfigError, match="choose one of \\['int8', 'int4'\\]"):
    Q.quantize_params(params, cfg, 'int2')
  qp, qcfg = Q.quantize_params(params, cfg, 'int8')
  with pytest.raises(ConfigError, match='already quantised'):
    Q.quantize_params(qp, qcfg, 'int8')
