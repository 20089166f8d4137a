"""Quantisation transforms: quantised models close to float, byte counts, checkpoints, errors
(the layers themselves: tests/models/test_quant.py)."""
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
  assert qcfg.quant.weights == scheme and qcfg.quant.activations == act
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
  out = transformer.build_model(cfg.with_quant(activations='dynamic')).apply(
      {'params': params}, *inputs)
  assert _rel(out, ref) < 0.04
  qat = transformer.build_model(cfg.with_quant(qat='int8'))
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
  with pytest.raises(ConfigError, match='not a multiple of model.quant.group_size=128'):
    Q.quantize_params(params, cfg, 'int4', group_size=128)
  with pytest.raises(ConfigError, match='calibration_inputs'):
    Q.quantize_params(params, cfg, 'int8', activation_quant='static')
  with pytest.raises(ConfigError, match="choose one of \\['int8', 'int4'\\]"):
    Q.quantize_params(params, cfg, 'int2')
  qp, qcfg = Q.quantize_params(params, cfg, 'int8')
  with pytest.raises(ConfigError, match='already quantised'):
    Q.quantize_params(qp, qcfg, 'int8')
