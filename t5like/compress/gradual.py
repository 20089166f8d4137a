"""Gradual pruning in training: Zhu & Gupta's polynomial schedule, masks in the optimizer state.

    tx = gradual.prune_during_training(make_optimizer(optim_cfg, params, steps), prune_cfg)
    opt_state = tx.init(params)             # masks start all True
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    params = optax.apply_updates(params, updates)

On step t (the wrapper's own count) with t in [begin_step, end_step] and (t - begin_step) a
multiple of update_every, the masks are recomputed from the current params at sparsity s_t
(`polynomial_sparsity`) with `PruneConfig.method` 'magnitude' (or N:M when `nm` is set) or
'structured'; masks only ever grow (pruned weights score lowest). Every step:
- the gradient is masked before the inner optimizer (no momentum builds up on pruned weights);
- the inner update is replaced by `-param` where the mask is False, so after `apply_updates`
  every pruned weight is exactly 0.0 (x + (-x) == +0.0 in IEEE arithmetic), whatever the inner
  optimizer does there (AdamW decay, momentum, Adafactor scaling).
The masks are an ordinary part of the optimizer state: checkpointed and sharded like moments.
`masks_of(opt_state)` finds them. Written here: optax has no pruning transform (this follows
jaxpruner's design: sparsity updaters wrapping an optax transformation).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from t5like.compress import prune
from t5like.config import ConfigError, PruneConfig


class GradualPruneState(NamedTuple):
  count: jax.Array          # update steps taken (int32)
  masks: Any                # bool tree like params (True = kept)
  inner_state: Any


def polynomial_sparsity(step, cfg: PruneConfig):
  """The polynomial schedule: s_f + (s_i - s_f) * (1 - progress)^power, held constant outside
  [begin_step, end_step] (s_i before, s_f after), piecewise constant between updates."""
  step = jnp.asarray(step, jnp.float32)
  span = max(cfg.end_step - cfg.begin_step, 1)
  last_update = cfg.begin_step + jnp.floor((step - cfg.begin_step) / cfg.update_every) * \
      cfg.update_every
  progress = jnp.clip((last_update - cfg.begin_step) / span, 0.0, 1.0)
  s = cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - progress) ** cfg.power
  return jnp.where(step < cfg.begin_step, 0.0, s)


def is_update_step(step, cfg: PruneConfig):
  step = jnp.asarray(step, jnp.int32)
  return ((step >= cfg.begin_step) & (step <= cfg.end_step) &
          ((step - cfg.begin_step) % cfg.update_every == 0))


def update_masks(params, masks, fraction, cfg: PruneConfig):
  """Masks at sparsity `fraction` (traced) from the current params, never un-pruning (jittable)."""
  if cfg.method == 'structured':
    scores = prune.unit_scores(params, cfg)
    prev = prune.unit_masks_of(params, masks, list(scores))
    um = prune.structured_unit_masks(params, scores, fraction, cfg, prev)
    return prune.expand_unit_masks(params, um, base=masks)
  scores = prune.magnitude_scores(params, cfg)
  if cfg.nm:
    return prune.nm_masks(params, scores, cfg.nm, masks)
  return prune.unstructured_masks(params, scores, fraction, cfg, masks)


def prune_during_training(inner: optax.GradientTransformation,
                          cfg: PruneConfig) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that it prunes on `cfg`'s schedule (see the module docstring)."""
  if cfg.method not in ('magnitude', 'structured'):
    raise ConfigError(f"gradual pruning supports prune.method 'magnitude' or 'structured', got "
                      f'{cfg.method!r} (gradient and greedy scores are one-shot: prune.compute_masks)')
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    prune.prunable(params, cfg)      # fail early on regexes that select nothing
    return GradualPruneState(jnp.zeros([], jnp.int32), prune.ones_masks(params),
                             inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('prune_during_training: tx.update needs params (the masks are scored on '
                       'them and pruned weights are driven to exactly zero)')
    fraction = polynomial_sparsity(state.count, cfg)
    masks = jax.lax.cond(is_update_step(state.count, cfg),
                         lambda: update_masks(params, state.masks, fraction, cfg),
                         lambda: state.masks)
    grads = prune.apply_masks(updates, masks)
    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p.astype(u.dtype)),
                               new_updates, params, masks)
    return new_updates, GradualPruneState(state.count + 1, masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_masks(inner: optax.GradientTransformation, masks) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that the weights `masks` (True = kept) removes stay exactly zero: fine-tuning
  after one-shot pruning. The masks sit in the state (`masks_of` finds them) and never change."""
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return GradualPruneState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.asarray, masks),
                             inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('keep_masks: tx.update needs params (pruned weights are driven to zero)')
    grads = prune.apply_masks(updates, state.masks)
    new_updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p.astype(u.dtype)),
                               new_updates, params, state.masks)
    return new_updates, GradualPruneState(state.count + 1, state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masks_of(opt_state):
  """The masks tree held in an optimizer state (searched through chains and wrappers)."""
  found = []

  def visit(x):
    if isinstance(x, GradualPruneState):
      found.append(x.masks)
      return
    if isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif isinstance(x, dict):
      for y in x.values():
        visit(y)
    elif hasattr(x, '__dict__') and not isinstance(x, jax.Array):
      for y in vars(x).values():
        visit(y)

  visit(opt_state)
  if len(found) != 1:
    raise ValueError(f'masks_of: expected one GradualPruneState in the optimizer state, found '
                     f'{len(found)}; wrap the optimizer with prune_during_training')
  return found[0]
