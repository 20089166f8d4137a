"""DynamicLossScale (t5like/precision.py): overflow skips the step and halves the scale."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like.config import OptimConfig
from t5like.optim import make_optimizer
from t5like.precision import (DynamicLossScale, NoOpLossScale, all_finite, get_policy,
                              make_loss_scale, select_tree)


def loss_fn(params, x):
  return jnp.mean((x @ params['w'] - 1.0) ** 2)


def make_step(tx):
  @jax.jit
  def step(params, opt_state, ls, x, inject_inf):
    grads = jax.grad(lambda p: ls.scale(loss_fn(p, x)))(params)
    grads = ls.unscale(grads)
    grads = jax.tree.map(lambda g: jnp.where(inject_inf, g.at[0, 0].set(jnp.inf), g), grads)
    finite = all_finite(grads)
    updates, new_opt = tx.update(grads, opt_state, params)
    params = select_tree(finite, optax.apply_updates(params, updates), params)
    opt_state = select_tree(finite, new_opt, opt_state)
    return params, opt_state, ls.adjust(finite), grads
  return step


def setup():
  params = {'w': jnp.full((3, 2), 0.1)}
  x = jnp.arange(12.0).reshape(4, 3) / 10.0
  tx = make_optimizer(OptimConfig(name='adamw', learning_rate=1e-2, schedule='constant',
                                  warmup_steps=0), params, 100)
  return params, x, tx


def test_injected_inf_skips_the_step_and_halves_the_scale():
  params, x, tx = setup()
  opt_state = tx.init(params)
  ls = DynamicLossScale.create(initial_scale=2.0 ** 10, period=3)
  step = make_step(tx)
  params1, opt1, ls1, grads = step(params, opt_state, ls, x, False)
  assert bool(all_finite(grads))
  assert not np.array_equal(np.asarray(params1['w']), np.asarray(params['w']))
  # Unscaled gradients equal the true gradients.
  np.testing.assert_allclose(np.asarray(grads['w']),
                             np.asarray(jax.grad(loss_fn)(params, x)['w']), rtol=1e-5)
  assert float(ls1.loss_scale) == 2.0 ** 10 and int(ls1.counter) == 1
  params2, opt2, ls2, grads = step(params1, opt1, ls1, x, True)
  assert not bool(all_finite(grads))
  np.testing.assert_array_equal(np.asarray(params2['w']), np.asarray(params1['w']))
  for a, b in zip(jax.tree.leaves(opt2), jax.tree.leaves(opt1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(ls2.loss_scale) == 2.0 ** 9
  assert int(ls2.counter) == 0 and int(ls2.skipped) == 1


def test_scale_grows_after_period_finite_steps_and_is_bounded():
  ls = DynamicLossScale.create(initial_scale=4.0, period=3, min_loss_scale=2.0,
                               max_loss_scale=16.0)
  adjust = jax.jit(lambda ls, f: ls.adjust(f))
  scales = []
  for finite in [True, True, True, True, True, True, True, True, True, False, False, False]:
    ls = adjust(ls, finite)
    scales.append(float(ls.loss_scale))
  assert scales == [4, 4, 8, 8, 8, 16, 16, 16, 16, 8, 4, 2]
  assert int(ls.skipped) == 3


def test_loss_scale_is_a_checkpointable_pytree():
  ls = DynamicLossScale.create(initial_scale=8.0, period=5).adjust(jnp.asarray(False))
  leaves, treedef = jax.tree.flatten(ls)
  assert len(leaves) == 3           # loss_scale, counter, skipped; the rest is static
  restored = jax.tree.unflatten(treedef, [np.asarray(v) for v in leaves])
  assert float(restored.loss_scale) == 4.0 and restored.period == 5


def test_fp16_gradients_overflow_without_scaling_down():
  # A large scale overflows fp16 gradients: adjust() then halves it.
  ls = DynamicLossScale.create(initial_scale=2.0 ** 15)
  g = {'w': jnp.asarray([4.0], jnp.float16)}
  scaled = jax.tree.map(lambda v: v * ls.loss_scale.astype(jnp.float16), g)
  assert not bool(all_finite(scaled))
  assert float(ls.adjust(all_finite(scaled)).loss_scale) == 2.0 ** 14


def test_policies_and_errors():
  assert isinstance(make_loss_scale(get_policy('fp16')), DynamicLossScale)
  noop = make_loss_scale(get_policy('bf16'))
  assert isinstance(noop, NoOpLossScale)
  assert noop.scale(3.0) == 3.0 and noop.adjust(False) is noop
  with pytest.raises(ValueError, match="policy 'f32' has no loss scaling"):
    make_loss_scale(get_policy('f32'), period=10)
  with pytest.raises(ValueError, match='period'):
    DynamicLossScale.create(period=0)
  with pytest.raises(ValueError, match='factor'):
    DynamicLossScale.create(factor=1.0)
  assert bool(all_finite({'i': jnp.arange(3), 'f': jnp.ones(2)}))
