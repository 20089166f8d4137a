"""Adaptive learning-rate scaling whose state lives in the optimizer state (so it is checkpointed).

Two transformations, both jittable:

- `plateau_scale(...)`: multiplies updates by a scale that `observe_validation(opt_state, value)`
  lowers by `factor` once the validation loss has not improved for `patience` evaluations.
  Optax has `optax.contrib.reduce_on_plateau`, but it is not used because (checked on optax 0.2.8):
  (1) its improvement test `value < (1 - rtol) * best - atol` is wrong for negative values: for
  best = -10, rtol = 0.1 the threshold is -9, so -9.5 (worse) counts as an improvement and becomes
  the new best, and the scale never drops; (2) it reads `value` at every `update`, i.e. every
  training step, so patience would count training steps re-reading one stale evaluation. Here the
  improvement test is `value < best - rtol * |best| - atol`, correct for any sign, and the state is
  advanced only when the trainer evaluates.

- `grad_norm_control(inner, ...)`: wraps the whole optimizer. It keeps exponentially weighted
  statistics (mean, variance) of the incoming global gradient norm, optionally scales the inner
  updates by a function of them ('cv': 1 / (1 + strength * std / mean), 'ratio':
  mean / norm, both clipped to [min_scale, 1]), and skips (zero update, inner state kept, as
  MaxText's `skip_step_on_spikes`) updates whose norm is not finite or exceeds mean + k * std once
  `min_steps` norms have been seen. MaxText keeps a rolling window and appends spikes unchanged;
  here a skipped spike enters the EMA clipped to the threshold, so the baseline can still drift up
  while a single huge spike does not inflate the variance; non-finite norms do not enter it.
  Skips are counted in the state.

`optimizer_metrics(opt_state, schedule)` reads the effective learning rate, the scales, the skip
count and the norm statistics out of any optimizer state built by `make_optimizer`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class PlateauState(NamedTuple):
  scale: jax.Array             # f32 multiplier of the updates
  best: jax.Array              # f32 best validation value seen (+inf before the first)
  plateau_count: jax.Array     # int32 evaluations since the last improvement
  cooldown_count: jax.Array    # int32 evaluations left in cool-down
  num_reductions: jax.Array    # int32 times the scale was reduced


class _PlateauConfig(NamedTuple):
  factor: float
  patience: int
  rtol: float
  atol: float
  cooldown: int
  min_scale: float


def plateau_scale(factor: float = 0.5, patience: int = 3, rtol: float = 1e-4, atol: float = 0.0,
                  cooldown: int = 0, min_scale: float = 0.0) -> optax.GradientTransformation:
  """Multiplies updates by `PlateauState.scale`; `observe_validation` advances the state."""
  if not 0.0 < factor < 1.0:
    raise ValueError(f'plateau_scale: factor must be in (0, 1), got {factor}')
  if rtol < 0.0 or atol < 0.0:
    raise ValueError(f'plateau_scale: rtol and atol must be >= 0, got {rtol}, {atol}')
  if patience < 0 or cooldown < 0:
    raise ValueError(f'plateau_scale: patience and cooldown must be >= 0, got {patience}, '
                     f'{cooldown}')
  hparams = _PlateauConfig(factor, patience, rtol, atol, cooldown, min_scale)

  def init_fn(params):
    del params
    return _PlateauHolder(PlateauState(
        scale=jnp.ones([], jnp.float32), best=jnp.full([], jnp.inf, jnp.float32),
        plateau_count=jnp.zeros([], jnp.int32), cooldown_count=jnp.zeros([], jnp.int32),
        num_reductions=jnp.zeros([], jnp.int32)), hparams)

  def update_fn(updates, state, params=None):
    del params
    scale = state.plateau.scale
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


@jax.tree_util.register_pytree_with_keys_class
class _PlateauHolder:
  """PlateauState plus its (static) hyper-parameters, so `observe_validation` needs no config."""

  def __init__(self, plateau: PlateauState, hparams: _PlateauConfig):
    self.plateau = plateau
    self.hparams = hparams

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey('plateau'), self.plateau),), self.hparams

  @classmethod
  def tree_unflatten(cls, hparams, children):
    return cls(children[0], hparams)

  def __repr__(self):
    return f'PlateauScale({self.plateau}, {self.hparams})'


def plateau_step(state: PlateauState, value, hp: _PlateauConfig) -> PlateauState:
  """One evaluation of reduce-on-plateau: returns the new state after observing `value`."""
  value = jnp.asarray(value, jnp.float32)
  finite_best = jnp.isfinite(state.best)
  threshold = state.best - hp.rtol * jnp.abs(state.best) - hp.atol
  improved = jnp.logical_or(jnp.logical_not(finite_best), value < threshold)
  improved = jnp.logical_and(improved, jnp.isfinite(value))
  best = jnp.where(improved, value, state.best)
  in_cooldown = state.cooldown_count > 0
  count = jnp.where(improved | in_cooldown, 0, state.plateau_count + 1)
  reduce = jnp.logical_and(count > hp.patience, jnp.logical_not(in_cooldown))
  scale = jnp.where(reduce, jnp.maximum(state.scale * hp.factor, hp.min_scale), state.scale)
  return PlateauState(
      scale=scale.astype(jnp.float32), best=best,
      plateau_count=jnp.where(reduce, 0, count).astype(jnp.int32),
      cooldown_count=jnp.where(reduce, hp.cooldown,
                               jnp.maximum(state.cooldown_count - 1, 0)).astype(jnp.int32),
      num_reductions=(state.num_reductions + reduce.astype(jnp.int32)))


def observe_validation(opt_state, value):
  """Feeds one validation value to every reduce-on-plateau state inside `opt_state`.

  Call it after each evaluation, outside or inside jit:
  `state = state.replace(opt_state=observe_validation(state.opt_state, eval_loss))`. Any pytree
  containing the optimizer state (a whole train state) works. Raises if there is no such state
  (the optimizer was built with `config.plateau=False`).
  """
  found = []

  def visit(x):
    if isinstance(x, _PlateauHolder):
      found.append(x)
      return _PlateauHolder(plateau_step(x.plateau, value, x.hparams), x.hparams)
    return x

  out = jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, _PlateauHolder))
  if not found:
    raise ValueError('observe_validation: the optimizer state has no reduce-on-plateau state; '
                     'build the optimizer with OptimConfig(plateau=True)')
  return out


class GradNormState(NamedTuple):
  inner_state: Any
  count: jax.Array             # int32 finite norms folded into the statistics
  mean: jax.Array              # f32 EMA of the norm (seeded with the first norm)
  var: jax.Array               # f32 exponentially weighted variance of the norm
  skipped: jax.Array           # int32 updates skipped so far
  last_norm: jax.Array         # f32 norm of the last gradient
  last_scale: jax.Array        # f32 learning-rate scale applied to the last update (0 if skipped)


def grad_norm_control(inner: optax.GradientTransformation, *, decay: float = 0.99,
                      scaling: str = 'none', strength: float = 1.0, min_scale: float = 0.1,
                      spike_k: float = 0.0, min_steps: int = 20) -> optax.GradientTransformation:
  """Wraps `inner` with gradient-norm statistics, lr scaling and spike skipping (module docstring).

  Args:
    inner: the optimizer to wrap (its updates are scaled; its state is kept on skipped steps).
    decay: EMA decay of the norm statistics.
    scaling: 'none', 'cv' or 'ratio'.
    strength: multiplier of std / mean for 'cv'.
    min_scale: lower bound of the lr scale.
    spike_k: skip when norm > mean + spike_k * std; 0 disables skipping (non-finite norms are
      still skipped).
    min_steps: number of norms seen before scaling or skipping starts.
  """
  if scaling not in _SCALINGS:
    raise ValueError(f'grad_norm_control: scaling={scaling!r} is not valid; choose one of '
                     f'{list(_SCALINGS)}')
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'grad_norm_control: decay must be in [0, 1), got {decay}')

  def init_fn(params):
    zero = jnp.zeros([], jnp.float32)
    return GradNormState(inner_state=inner.init(params), count=jnp.zeros([], jnp.int32),
                         mean=zero, var=zero, skipped=jnp.zeros([], jnp.int32),
                         last_norm=zero, last_scale=jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    norm = optax.global_norm(updates).astype(jnp.float32)
    mean, std = grad_norm_stats(state)
    ready = state.count >= min_steps
    threshold = mean + spike_k * std
    finite = jnp.isfinite(norm)
    spike = jnp.logical_and(ready, norm > threshold) if spike_k > 0 else jnp.asarray(False)
    skip = jnp.logical_or(jnp.logical_not(finite), spike)
    scale = jnp.where(ready, _SCALINGS[scaling](norm, mean, std, strength), 1.0)
    scale = jnp.clip(scale, min_scale, 1.0).astype(jnp.float32)

    def do_update():
      new_updates, new_inner = _call(inner, updates, state.inner_state, params, extra_args)
      return jax.tree.map(lambda u: u * scale.astype(u.dtype), new_updates), new_inner

    def skip_update():
      return jax.tree.map(jnp.zeros_like, updates), state.inner_state

    new_updates, new_inner = jax.lax.cond(skip, skip_update, do_update)
    # Exponentially weighted mean and variance (incremental form, Finch 2009), seeded with the
    # first norm so that no bias correction is needed.
    folded = jnp.where(spike, threshold, norm)
    diff = folded - state.mean
    incr = jnp.where(state.count > 0, (1.0 - decay) * diff, diff)
    new_mean = jnp.where(finite, state.mean + incr, state.mean)
    new_var = jnp.where(finite & (state.count > 0), decay * (state.var + diff * incr), state.var)
    return new_updates, GradNormState(
        inner_state=new_inner, count=state.count + finite.astype(jnp.int32), mean=new_mean,
        var=new_var, skipped=state.skipped + skip.astype(jnp.int32), last_norm=norm,
        last_scale=jnp.where(skip, 0.0, scale))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def grad_norm_stats(state: GradNormState):
  """(mean, std) of the gradient norms folded into `state` (0, 0 before any)."""
  return state.mean, jnp.sqrt(jnp.maximum(state.var, 0.0))


def _call(tx, updates, state, params, extra_args):
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return tx.update(updates, state, params, **extra_args)
  return tx.update(updates, state, params)


def _cv_scale(norm, mean, std, strength):
  del norm
  return 1.0 / (1.0 + strength * std / jnp.maximum(mean, 1e-12))


def _ratio_scale(norm, mean, std, strength):
  del std, strength
  return mean / jnp.maximum(norm, 1e-12)


_SCALINGS = {'none': lambda norm, mean, std, strength: jnp.ones([], jnp.float32),
             'cv': _cv_scale, 'ratio': _ratio_scale}


def optimizer_metrics(opt_state, schedule: Optional[optax.Schedule] = None) -> dict:
  """Scalars for the metrics writer, read from an optimizer state built by `make_optimizer`.

  Keys (present when the matching part exists): 'learning_rate' (needs `schedule`: the base rate of
  the next update, the schedule at the optimizer's own update count (skipped steps do not advance
  it) times the plateau scale), 'lr_plateau_scale', 'plateau_best', 'lr_grad_scale' (the
  gradient-statistics factor applied to the last update, 0 if it was skipped), 'skipped_steps',
  'grad_norm' (last), 'grad_norm_mean', 'grad_norm_std'. Jittable.
  """
  holders, grad_states, sched_states = [], [], []

  def visit(x):
    if isinstance(x, _PlateauHolder):
      holders.append(x)
    elif isinstance(x, GradNormState):
      grad_states.append(x)
      jax.tree.map(visit, x.inner_state, is_leaf=_is_node)
    elif isinstance(x, optax.ScaleByScheduleState):
      sched_states.append(x)
    return x

  jax.tree.map(visit, opt_state, is_leaf=_is_node)
  out = {}
  lr_factor = jnp.ones([], jnp.float32)
  if holders:
    out['lr_plateau_scale'] = holders[0].plateau.scale
    out['plateau_best'] = holders[0].plateau.best
    lr_factor = lr_factor * holders[0].plateau.scale
  if grad_states:
    g = grad_states[0]
    mean, std = grad_norm_stats(g)
    out.update(lr_grad_scale=g.last_scale, skipped_steps=g.skipped, grad_norm=g.last_norm,
               grad_norm_mean=mean, grad_norm_std=std)
  if schedule is not None:
    if len(sched_states) != 1:
      raise ValueError(f'optimizer_metrics: expected one schedule state (optax '
                       f'ScaleByScheduleState) in the optimizer state, found {len(sched_states)}')
    out['learning_rate'] = jnp.asarray(schedule(sched_states[0].count), jnp.float32) * lr_factor
  return out


def _is_node(x):
  return isinstance(x, (_PlateauHolder, GradNormState, optax.ScaleByScheduleState))
