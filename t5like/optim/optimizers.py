"""`make_optimizer(config, params, total_steps)`: the optax chain of an OptimConfig.

The chain, in order: global-norm clipping (`config.clip_grad_norm`, 0 disables); the optimizer
`config.name` with its learning rate from `make_schedule(config, total_steps)` and decoupled weight
decay masked by `decay_mask`; then, optionally, the reduce-on-plateau scale (`config.plateau`).
When `config.grad_lr_scaling != 'none'` or `config.spike_k > 0`, the whole chain is wrapped by
`grad_norm_control`, which sees the gradient before clipping.

Everything except AGD, the path-regex mask and the adaptive wrappers is optax's own: sgd (trace),
adamw, adam, lars and lamb (composed from optax's parts only so that `mu_dtype` reaches the moment
accumulators), adafactor with T5's settings (factored second moments, decay_rate 0.8, update
clipping 1.0, multiply_by_parameter_scale, no momentum; composed from optax's parts so that weight
decay is lr-scaled). Weight decay is decoupled everywhere (p -= lr * weight_decay * p) except for
'lars', where, as in the LARS paper and optax.lars, it enters the trust ratio.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from t5like.config import OPTIMIZER_NAMES, ConfigError, OptimConfig
from t5like.optim import adaptive, agd, schedules


def param_path(path) -> str:
  """'/'-joined names of a jax key path: ('encoder', 'layers', 0, 'kernel') -> 'encoder/layers/0/kernel'."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return '/'.join(parts)


def decay_mask(exclude: Sequence[str]) -> Callable[[Any], Any]:
  """A function params -> pytree of bools: False where the '/'-joined path matches a regex.

  Flax metadata boxes (`nn.with_logical_partitioning`) are kept: the mask then holds a box around a
  bool, so it has exactly the structure of the (boxed) params; the box's own '.value' is not part of
  the path.
  """
  try:
    compiled = [re.compile(p) for p in exclude]
  except re.error as e:
    raise ConfigError(f'optim.weight_decay_exclude: invalid regex {e.pattern!r}: {e}') from None

  def decays(path) -> bool:
    name = param_path(path)
    return not any(c.search(name) for c in compiled)

  def mask_fn(params):
    def leaf(path, x):
      if isinstance(x, meta.AxisMetadata):
        return x.replace_boxed(decays(path))
      return decays(path)
    return jax.tree_util.tree_map_with_path(
        leaf, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))

  return mask_fn


def make_optimizer(config: OptimConfig, params, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of `config` for `params` (arrays, ShapeDtypeStructs or flax-boxed) and a run of
  `total_steps` updates (the schedule's horizon when `config.decay_steps` is 0).

  `params` is not read today (the weight-decay mask is a function applied to the tree at
  `init`/`update`), so None is accepted; it is part of the signature so that per-parameter choices
  need no API change. Call `tx.init(params)` as usual;
  the result is an `optax.GradientTransformationExtraArgs` when `grad_norm_control` wraps it.
  """
  del params
  if config.name not in _BUILDERS:
    raise ConfigError(f'optim.name={config.name!r} is not valid; choose one of {sorted(_BUILDERS)}')
  if total_steps <= 0:
    raise ConfigError(f'make_optimizer: total_steps must be positive, got {total_steps}')
  schedule = schedules.make_schedule(config, total_steps)
  mask = decay_mask(config.weight_decay_exclude)
  mu_dtype = jnp.dtype(config.mu_dtype) if config.mu_dtype else None
  parts = []
  if config.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_grad_norm))
  parts.append(_BUILDERS[config.name](config, schedule, mask, mu_dtype))
  if config.plateau:
    parts.append(adaptive.plateau_scale(
        factor=config.plateau_factor, patience=config.plateau_patience, rtol=config.plateau_rtol,
        atol=config.plateau_atol, cooldown=config.plateau_cooldown,
        min_scale=config.plateau_min_scale))
  tx = optax.chain(*parts)
  if config.grad_lr_scaling != 'none' or config.spike_k > 0:
    tx = adaptive.grad_norm_control(
        tx, decay=config.grad_stats_decay, scaling=config.grad_lr_scaling,
        strength=config.grad_lr_strength, min_scale=config.grad_lr_min_scale,
        spike_k=config.spike_k, min_steps=config.spike_min_steps)
  return tx


def _decay_parts(config, mask):
  return [optax.add_decayed_weights(config.weight_decay, mask)] if config.weight_decay else []


def _sgd(config, schedule, mask, mu_dtype):
  parts = []
  if config.momentum:
    parts.append(optax.trace(decay=config.momentum, nesterov=config.nesterov,
                             accumulator_dtype=mu_dtype))
  elif config.nesterov:
    raise ConfigError("optim.nesterov=True needs optim.momentum > 0 with optim.name='sgd'")
  # Decoupled (SGDW): the decay term does not pass through the momentum.
  return optax.chain(*parts, *_decay_parts(config, mask), optax.scale_by_learning_rate(schedule))


def _adam(config, schedule, mask, mu_dtype):
  if config.weight_decay:
    raise ConfigError(f"optim.name='adam' has no weight decay but optim.weight_decay="
                      f"{config.weight_decay}; use optim.name='adamw' or set optim.weight_decay=0")
  return optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps, mu_dtype=mu_dtype)


def _adamw(config, schedule, mask, mu_dtype):
  return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, mu_dtype=mu_dtype,
                     weight_decay=config.weight_decay, mask=mask)


def _lars(config, schedule, mask, mu_dtype):
  # optax.lars, with the momentum accumulator's dtype exposed.
  return optax.chain(
      *_decay_parts(config, mask),
      optax.scale_by_trust_ratio(trust_coefficient=config.lars_trust_coefficient, eps=0.0),
      optax.scale_by_learning_rate(schedule),
      optax.trace(decay=config.momentum, nesterov=config.nesterov, accumulator_dtype=mu_dtype))


def _lamb(config, schedule, mask, mu_dtype):
  # optax.lamb, with the first moment's dtype exposed.
  return optax.chain(
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps, mu_dtype=mu_dtype),
      *_decay_parts(config, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(schedule))


def _adafactor(config, schedule, mask, mu_dtype):
  if mu_dtype is not None:
    raise ConfigError("optim.mu_dtype is set but optim.name='adafactor' (T5 settings) keeps no "
                      "first moment; set optim.mu_dtype=''")
  # optax.adafactor(momentum=None) from its own parts, except that optax adds its
  # `weight_decay_rate` after the learning rate (p -= wd * p, not scaled by lr); here the decay is
  # decoupled and lr-scaled like every other optimizer. Without decay it equals optax.adafactor.
  parts = [optax.scale_by_factored_rms(factored=config.adafactor_factored,
                                       decay_rate=config.adafactor_decay_rate)]
  if config.adafactor_clipping_threshold:
    parts.append(optax.clip_by_block_rms(config.adafactor_clipping_threshold))
  if config.adafactor_multiply_by_parameter_scale:
    parts.append(optax.scale_by_param_block_rms())
  return optax.chain(*parts, *_decay_parts(config, mask), optax.scale_by_learning_rate(schedule))


def _agd(config, schedule, mask, mu_dtype):
  return agd.agd(schedule, b1=config.b1, b2=config.b2, delta=config.agd_delta,
                 weight_decay=config.weight_decay, amsgrad=config.agd_amsgrad,
                 clip=config.agd_clip or None, weight_decay_mask=mask, mu_dtype=mu_dtype)


_BUILDERS = {'sgd': _sgd, 'adam': _adam, 'adamw': _adamw, 'lars': _lars, 'lamb': _lamb,
             'adafactor': _adafactor, 'agd': _agd}
assert tuple(_BUILDERS) == OPTIMIZER_NAMES, 'keep t5like.config.OPTIMIZER_NAMES in sync'
