"""Reduce-on-plateau and gradient-norm statistics: state behaviour, spike skipping, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like.config import OptimConfig
from t5like.optim import (grad_norm_control, make_optimizer, make_schedule, observe_validation,
                          optimizer_metrics, plateau_scale)
from t5like.optim.adaptive import GradNormState


def plateau_state(tx_state):
  return tx_state.plateau


def observe_all(state, values):
  step = jax.jit(observe_validation)
  scales = []
  for v in values:
    state = step(state, v)
    scales.append(float(plateau_state(state).scale))
  return state, scales


def test_plateau_is_shift_invariant_with_atol():
  """With an absolute tolerance only, shifting every value (through zero) changes nothing."""
  base = [10.0, 9.0, 8.95, 9.5, 8.99, 8.0, 8.0, 8.0]
  runs = []
  for offset in (0.0, -9.0, -100.0):
    tx = plateau_scale(factor=0.5, patience=2, rtol=0.0, atol=0.1)
    _, scales = observe_all(tx.init({}), [v + offset for v in base])
    runs.append(scales)
  # 10 -> 9 improves; 8.95, 9.5, 8.99 are not 0.1 better: reduce on the third; 8.0 improves.
  assert runs[0] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
  assert runs[1] == runs[0] and runs[2] == runs[0]


def reference_plateau(values, factor, patience, rtol, atol=0.0, cooldown=0, min_scale=0.0):
  """Plain-Python reduce-on-plateau (mode 'min', sign-correct threshold)."""
  best, count, cool, scale, out = None, 0, 0, 1.0, []
  for v in values:
    improved = best is None or v < best - rtol * abs(best) - atol
    if improved:
      best = v
    if improved or cool > 0:
      count = 0
    else:
      count += 1
    if count > patience and cool == 0:
      scale, count, cool = max(scale * factor, min_scale), 0, cooldown
    else:
      cool = max(cool - 1, 0)
    out.append(scale)
  return out


@pytest.mark.parametrize('sign', [1.0, -1.0])
@pytest.mark.parametrize('cooldown', [0, 2])
def test_plateau_matches_reference_for_both_signs(sign, cooldown):
  rng = np.random.default_rng(1)
  # A loss curve that improves, then plateaus with noise; shifted so it is entirely positive or
  # entirely negative.
  curve = np.concatenate([np.linspace(3.0, 2.0, 6), 2.0 + 0.01 * rng.normal(size=14)])
  values = [float(v) for v in (curve + 10.0 if sign > 0 else curve - 10.0)]
  tx = plateau_scale(factor=0.5, patience=2, rtol=1e-3, cooldown=cooldown, min_scale=0.1)
  _, scales = observe_all(tx.init({}), values)
  np.testing.assert_allclose(scales, reference_plateau(values, 0.5, 2, 1e-3, cooldown=cooldown,
                                                       min_scale=0.1), rtol=1e-6)
  assert min(scales) < 1.0


def test_plateau_negative_values_worse_is_not_an_improvement():
  """optax.contrib.reduce_on_plateau takes -9.5 as an improvement over -10 (rtol 0.1); we do not."""
  tx = plateau_scale(factor=0.5, patience=1, rtol=0.1)
  state, scales = observe_all(tx.init({}), [-10.0, -9.5, -9.5])
  assert float(plateau_state(state).best) == -10.0
  assert scales == [1.0, 1.0, 0.5]


def test_plateau_scale_multiplies_updates_and_lives_in_make_optimizer_state():
  params = {'w': jnp.ones(3)}
  config = OptimConfig(name='sgd', momentum=0.0, learning_rate=0.1, schedule='constant',
                       warmup_steps=0, weight_decay=0.0, clip_grad_norm=0.0, plateau=True,
                       plateau_patience=0, plateau_factor=0.25)
  tx = make_optimizer(config, params, 100)
  state = tx.init(params)
  grads = {'w': jnp.ones(3)}
  u0, state = tx.update(grads, state, params)
  state = observe_validation(state, 2.0)
  state = observe_validation(state, 2.0)          # no improvement, patience 0 -> x0.25
  u1, state = tx.update(grads, state, params)
  np.testing.assert_allclose(np.asarray(u1['w']), 0.25 * np.asarray(u0['w']), rtol=1e-6)
  metrics = optimizer_metrics(state, make_schedule(config, 100))
  np.testing.assert_allclose(float(metrics['learning_rate']), 0.1 * 0.25, rtol=1e-6)
  assert float(metrics['lr_plateau_scale']) == 0.25
  # The plateau state round-trips through flatten / unflatten (what a checkpoint does).
  leaves, treedef = jax.tree.flatten(state)
  restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  assert float(optimizer_metrics(restored)['lr_plateau_scale']) == 0.25
  # A train-state-like container works too.
  wrapped = observe_validation({'opt_state': state, 'step': jnp.zeros([])}, 3.0)
  assert 'opt_state' in wrapped


def test_observe_validation_without_plateau_state_is_an_error():
  tx = make_optimizer(OptimConfig(), {'w': jnp.ones(2)}, 1000)
  with pytest.raises(ValueError, match='plateau=True'):
    observe_validation(tx.init({'w': jnp.ones(2)}), 1.0)


def spike_run(grad_scales, **kw):
  params = {'w': jnp.zeros(4)}
  tx = grad_norm_control(optax.sgd(0.1, momentum=0.9), **kw)
  state = tx.init(params)
  update = jax.jit(tx.update)
  outs = []
  for s in grad_scales:
    u, state = update({'w': jnp.full((4,), s)}, state, params)
    outs.append(np.asarray(u['w']))
  return state, outs


def test_spikes_are_skipped_and_counted():
  rng = np.random.default_rng(0)
  scales = list(1.0 + 0.05 * rng.normal(size=30))
  scales[25] = 10.0          # a spike of ~180 standard deviations
  scales[27] = float('inf')  # a non-finite gradient
  state, outs = spike_run(scales, spike_k=4.0, min_steps=10, decay=0.9)
  assert int(state.skipped) == 2
  np.testing.assert_array_equal(outs[25], 0.0)
  np.testing.assert_array_equal(outs[27], 0.0)
  assert all(np.abs(o).sum() > 0 for i, o in enumerate(outs) if i not in (25, 27))
  # Non-finite norms do not enter the statistics; the spike enters clipped to the threshold.
  assert int(state.count) == 29
  assert np.isfinite(float(state.mean)) and float(state.mean) < 3.0
  metrics = optimizer_metrics(state)
  assert int(metrics['skipped_steps']) == 2
  assert float(metrics['lr_grad_scale']) == 1.0


def test_skipped_step_keeps_the_inner_state():
  scales = [1.0] * 12 + [50.0]
  state_before, _ = spike_run(scales[:-1], spike_k=3.0, min_steps=5)
  state_after, outs = spike_run(scales, spike_k=3.0, min_steps=5)
  np.testing.assert_array_equal(outs[-1], 0.0)
  for a, b in zip(jax.tree.leaves(state_before.inner_state),
                  jax.tree.leaves(state_after.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_skips_during_burn_in():
  state, outs = spike_run([1.0, 1.0, 100.0, 1.0], spike_k=1.0, min_steps=5)
  assert int(state.skipped) == 0
  assert np.abs(outs[2]).sum() > 0


def test_grad_stats_match_closed_form():
  norms = [1.0, 2.0, 4.0, 3.0]
  state, _ = spike_run([n / 2.0 for n in norms], decay=0.5)   # ||(s,s,s,s)|| = 2s
  mean, var = norms[0], 0.0
  for x in norms[1:]:
    diff = x - mean
    mean += 0.5 * diff
    var = 0.5 * (var + diff * 0.5 * diff)
  np.testing.assert_allclose(float(state.mean), mean, rtol=1e-6)
  np.testing.assert_allclose(float(state.var), var, rtol=1e-6)
  assert int(state.skipped) == 0


@pytest.mark.parametrize('scaling', ['cv', 'ratio'])
def test_grad_lr_scaling(scaling):
  # After burn-in on unit-norm gradients, a gradient twice as large: 'ratio' halves its step;
  # 'cv' depends on the spread of the norms seen.
  scales = [0.5, 0.4, 0.6, 0.5, 1.0]
  state, outs = spike_run(scales, scaling=scaling, min_steps=4, decay=0.5, strength=1.0,
                          min_scale=0.05)
  # Rebuild the statistics before the last step.
  prev, _ = spike_run(scales[:-1], decay=0.5)
  mean, std = float(prev.mean), float(np.sqrt(prev.var))
  norm = 2.0 * scales[-1]
  expected = mean / norm if scaling == 'ratio' else 1.0 / (1.0 + std / mean)
  np.testing.assert_allclose(float(state.last_scale), min(max(expected, 0.05), 1.0), rtol=1e-5)
  assert float(state.last_scale) < 1.0


def test_make_optimizer_wraps_with_grad_norm_control():
  params = {'w': jnp.ones(3)}
  config = OptimConfig(spike_k=3.0, spike_min_steps=3, warmup_steps=1)
  tx = make_optimizer(config, params, 50)
  state = tx.init(params)
  assert isinstance(state, GradNormState)
  update = jax.jit(tx.update)
  for g in [1.0, 1.1, 0.9, 1.0, 1e4]:
    _, state = update({'w': jnp.full((3,), g)}, state, params)
  metrics = optimizer_metrics(state, make_schedule(config, 50))
  assert int(metrics['skipped_steps']) == 1
  # The skipped step did not advance the schedule's count: 4 applied updates.
  np.testing.assert_allclose(float(metrics['learning_rate']),
                             float(make_schedule(config, 50)(4)), rtol=1e-6)
  assert set(metrics) >= {'learning_rate', 'skipped_steps', 'grad_norm_mean', 'grad_norm_std'}
