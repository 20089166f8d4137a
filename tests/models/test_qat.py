"""QAT at model level: the fake-quantised model is the float model at quantised weights.

Hand computation: every projection kernel replaced by its quantise-dequantise image (per layer of
the scanned stack, contraction = the dims before the output channels) gives a float model whose
logits equal the QAT model's, and whose gradient equals the QAT gradient (straight-through: the
gradient with respect to w is the float gradient evaluated at q(w)). A no-op QAT (qat ignored)
fails the first test, because the QAT logits then equal the float logits at the unquantised
weights, which differ from the quantised ones by more than the tolerance.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.models import build_model, quant


def _cfg(qat: str):
  # Untied head: the embedding lookup stays float in QAT; every projection (lm_head included)
  # is a FakeQuantEinsum.
  return get_variant('t5_1_1_tiny').with_quant(qat=qat, group_size=32)


@pytest.fixture(scope='module')
def setup():
  cfg = _cfg('none')
  model = build_model(cfg)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  enc = jax.random.randint(k1, (2, 12), 2, cfg.vocab_size)
  dec = jax.random.randint(k2, (2, 8), 2, cfg.vocab_size)
  boxed = model.init(k3, enc, dec)['params']
  return cfg, boxed, nn.unbox(boxed), enc, dec


def fake_quantised(boxed, scheme: str):
  """The params with every kernel quantised-dequantised, computed outside the model."""
  qcfg = _cfg(scheme)

  def leaf(path, x):
    w = x.value
    if getattr(path[-1], 'key', None) != 'kernel':
      return w
    names = x.names
    stacked = names[0] == 'layers'
    inner = names[1:] if stacked else names
    contract = 2 if inner[:2] == ('heads', 'kv') else 1   # attention 'out': [N, H, D]
    def fq(k):   # quantise-dequantise with the stored-weight functions, not the QAT layer's
      q, s = quant.quantize_kernel(k, contract, scheme, qcfg.quant.group_size)
      return quant.dequantize_kernel(q, s, k.shape, contract, scheme)
    return jax.vmap(fq)(w) if stacked else fq(w)

  return jax.tree_util.tree_map_with_path(leaf, boxed,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg, params, enc, dec):
  return build_model(cfg).apply({'params': params}, enc, dec)


@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_qat_forward_is_the_float_forward_at_quantised_weights(setup, scheme):
  cfg, boxed, params, enc, dec = setup
  fq = fake_quantised(boxed, scheme)
  # The fixture varies: every kernel moves when quantised.
  for path, (w, q) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          zip(jax.tree.leaves(params), jax.tree.leaves(fq))):
    if 'kernel' in jax.tree_util.keystr(path[0]):
      assert float(jnp.abs(w - q).max()) > 0, path[0]
  y_qat = logits(_cfg(scheme), params, enc, dec)
  y_f32 = logits(cfg, params, enc, dec)
  y_hand = logits(cfg, fq, enc, dec)
  np.testing.assert_allclose(y_qat, y_hand, atol=2e-5, rtol=1e-5)
  # ... and differs from the float forward by the quantisation error: visibly, but not more.
  diff = float(jnp.abs(y_qat - y_f32).max())
  rel = float(jnp.linalg.norm(y_qat - y_f32) / jnp.linalg.norm(y_f32))
  assert diff > 100 * 2e-5, diff
  assert rel < (0.02 if scheme == 'int8' else 0.3), rel


def test_qat_gradient_is_exactly_straight_through(setup):
  cfg, boxed, params, enc, dec = setup
  scheme = 'int4'
  fq = fake_quantised(boxed, scheme)
  probe = jax.random.normal(jax.random.key(7), logits(cfg, params, enc, dec).shape)

  @functools.partial(jax.jit, static_argnums=0)
  def grad(c, p):
    return jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(logits(c, p, enc, dec)) * probe))(p)

  g_qat = grad(_cfg(scheme), params)
  g_hand = grad(cfg, fq)                    # the float gradient at q(w), applied to w
  g_f32 = grad(cfg, params)
  for a, b in zip(jax.tree.leaves(g_qat), jax.tree.leaves(g_hand)):
    # Equal up to float summation order (the two programs differ only in where q(w) is formed).
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)
  # The straight-through gradient is not the float gradient at w (the forward really quantised).
  gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_qat),
                                                          jax.tree.leaves(g_f32)))
  assert gap > 1e-4, gap
