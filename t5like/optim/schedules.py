"""Learning-rate schedules from an OptimConfig, built from optax's schedules.

`make_schedule(config, total_steps)` returns an optax schedule (a jittable function of the update
count, 0 for the first update). Optax provides the pieces; this module only maps config names to
them and adds T5's rsqrt and warm-up-stable-decay, which optax lacks.

Names (`config.schedule`), with lr = `config.learning_rate`, w = `config.warmup_steps`,
H = `config.decay_steps` or `total_steps` (the step at which decay ends, warm-up included),
e = `config.end_lr_fraction`:

- every schedule except rsqrt first warms up linearly from 0 to lr over w steps;
- 'constant': lr;
- 'linear': lr -> e*lr linearly over the H - w steps after warm-up, then e*lr;
- 'cosine': lr -> e*lr along a half cosine over H - w steps, then e*lr;
- 'exponential': lr * e^((step - w) / (H - w)), floored at e*lr (so it reaches e*lr at H);
- 'rsqrt': T5's lr / sqrt(max(step, w)); w is T5's flat warm-up (10k steps with lr = 1.0 in the
  paper: 0.01 for 10k steps, then inverse square root decay); no linear ramp;
- 'wsd': warm-up, stable at lr, then linear decay to e*lr over the last
  `config.wsd_decay_fraction` * H steps.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from t5like.config import SCHEDULE_NAMES, ConfigError, OptimConfig


def rsqrt_schedule(learning_rate: float, warmup_steps: int) -> optax.Schedule:
  """T5's inverse square root schedule: learning_rate / sqrt(max(step, warmup_steps, 1))."""
  floor = float(max(warmup_steps, 1))

  def schedule(step):
    return learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32),
                                                               floor)))
  return schedule


def warmup_stable_decay_schedule(learning_rate: float, warmup_steps: int, horizon: int,
                                 decay_fraction: float, end_value: float) -> optax.Schedule:
  """Linear warm-up to learning_rate, flat, then linear decay to end_value ending at `horizon`."""
  decay_steps = int(round(decay_fraction * horizon))
  stable_steps = horizon - warmup_steps - decay_steps
  if stable_steps < 0:
    raise ConfigError(f'optim.schedule=\'wsd\': warmup_steps ({warmup_steps}) + decay '
                      f'({decay_steps} = wsd_decay_fraction * {horizon}) exceed the horizon '
                      f'{horizon}; lower optim.warmup_steps or optim.wsd_decay_fraction')
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
       optax.constant_schedule(learning_rate),
       optax.linear_schedule(learning_rate, end_value, max(decay_steps, 1))],
      [warmup_steps, warmup_steps + stable_steps])


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `config` for a run of `total_steps` updates."""
  if config.schedule not in _BUILDERS:
    raise ConfigError(f'optim.schedule={config.schedule!r} is not valid; choose one of '
                      f'{sorted(_BUILDERS)}')
  horizon = config.decay_steps or total_steps
  if config.schedule != 'rsqrt' and horizon <= config.warmup_steps:
    raise ConfigError(f'optim.schedule={config.schedule!r}: the decay horizon ({horizon} = '
                      f'optim.decay_steps or total_steps) must exceed optim.warmup_steps '
                      f'({config.warmup_steps})')
  return _BUILDERS[config.schedule](config, horizon)


def _with_warmup(config: OptimConfig, after: optax.Schedule) -> optax.Schedule:
  if config.warmup_steps == 0:
    return after
  ramp = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.join_schedules([ramp, after], [config.warmup_steps])


def _constant(config, horizon):
  del horizon
  return _with_warmup(config, optax.constant_schedule(config.learning_rate))


def _linear(config, horizon):
  lr = config.learning_rate
  return _with_warmup(config, optax.linear_schedule(lr, lr * config.end_lr_fraction,
                                                    horizon - config.warmup_steps))


def _cosine(config, horizon):
  lr = config.learning_rate
  return _with_warmup(config, optax.cosine_decay_schedule(
      lr, horizon - config.warmup_steps, alpha=config.end_lr_fraction))


def _exponential(config, horizon):
  lr = config.learning_rate
  if config.end_lr_fraction <= 0.0:
    raise ConfigError("optim.schedule='exponential' needs optim.end_lr_fraction in (0, 1], got "
                      f'{config.end_lr_fraction}')
  return _with_warmup(config, optax.exponential_decay(
      lr, horizon - config.warmup_steps, config.end_lr_fraction,
      end_value=lr * config.end_lr_fraction))


def _rsqrt(config, horizon):
  del horizon
  return rsqrt_schedule(config.learning_rate, config.warmup_steps)


def _wsd(config, horizon):
  return warmup_stable_decay_schedule(config.learning_rate, config.warmup_steps, horizon,
                                      config.wsd_decay_fraction,
                                      config.learning_rate * config.end_lr_fraction)


_BUILDERS = {'constant': _constant, 'linear': _linear, 'cosine': _cosine,
             'exponential': _exponential, 'rsqrt': _rsqrt, 'wsd': _wsd}
assert tuple(_BUILDERS) == SCHEDULE_NAMES, 'keep t5like.config.SCHEDULE_NAMES in sync'
