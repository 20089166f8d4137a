"""Schedule values at chosen steps against their closed forms."""
import math

import numpy as np
import pytest

from t5like.config import SCHEDULE_NAMES, ConfigError, OptimConfig, from_dict
from t5like.optim import make_schedule

LR, W, TOTAL, END = 2e-3, 10, 110, 0.1


def lr_at(schedule, step):
  return float(schedule(step))


def cfg(name, **kw):
  return OptimConfig(schedule=name, learning_rate=LR, warmup_steps=W, end_lr_fraction=END, **kw)


def closed_form(name, step, horizon=TOTAL, wsd_fraction=0.1):
  if name == 'rsqrt':
    return LR / math.sqrt(max(step, W))
  if step < W:
    return LR * step / W
  k, n = step - W, horizon - W
  f = min(k / n, 1.0)
  if name == 'constant':
    return LR
  if name == 'linear':
    return LR + (LR * END - LR) * f
  if name == 'cosine':
    return LR * (END + (1 - END) * 0.5 * (1 + math.cos(math.pi * f)))
  if name == 'exponential':
    return max(LR * END ** (k / n), LR * END)
  if name == 'wsd':
    decay = round(wsd_fraction * horizon)
    start = horizon - decay
    if step < start:
      return LR
    return LR + (LR * END - LR) * min((step - start) / decay, 1.0)
  raise AssertionError(name)


@pytest.mark.parametrize('name', SCHEDULE_NAMES)
def test_schedule_closed_form(name):
  schedule = make_schedule(cfg(name), TOTAL)
  for step in (0, 1, 5, 9, 10, 11, 37, 60, 99, 100, 105, 110, 200):
    np.testing.assert_allclose(lr_at(schedule, step), closed_form(name, step), rtol=1e-5,
                               err_msg=f'{name} at step {step}')


def test_decay_steps_overrides_total():
  schedule = make_schedule(cfg('linear', decay_steps=60), TOTAL)
  np.testing.assert_allclose(lr_at(schedule, 35), closed_form('linear', 35, horizon=60), rtol=1e-6)
  np.testing.assert_allclose(lr_at(schedule, 80), LR * END, rtol=1e-6)


def test_no_warmup_starts_at_peak():
  for name in ('constant', 'linear', 'cosine', 'exponential'):
    schedule = make_schedule(OptimConfig(schedule=name, learning_rate=LR, warmup_steps=0), 100)
    np.testing.assert_allclose(lr_at(schedule, 0), LR, rtol=1e-6)


def test_t5_rsqrt():
  # T5: learning_rate 1.0, 10k flat steps at 0.01, then 1/sqrt(step).
  schedule = make_schedule(OptimConfig(schedule='rsqrt', learning_rate=1.0, warmup_steps=10_000),
                           1_000_000)
  np.testing.assert_allclose(lr_at(schedule, 0), 0.01, rtol=1e-6)
  np.testing.assert_allclose(lr_at(schedule, 10_000), 0.01, rtol=1e-6)
  np.testing.assert_allclose(lr_at(schedule, 40_000), 0.005, rtol=1e-6)


def test_wsd_fraction():
  schedule = make_schedule(cfg('wsd', wsd_decay_fraction=0.5), TOTAL)
  for step in (20, 54, 56, 80, 110):
    np.testing.assert_allclose(lr_at(schedule, step),
                               closed_form('wsd', step, wsd_fraction=0.5), rtol=1e-5)


def test_schedule_errors_name_the_problem():
  with pytest.raises(ConfigError, match=r"optim.schedule='poly' is not valid; choose one of"):
    OptimConfig(schedule='poly')
  with pytest.raises(ConfigError, match='must exceed optim.warmup_steps'):
    make_schedule(cfg('cosine'), W)
  with pytest.raises(ConfigError, match='end_lr_fraction'):
    make_schedule(OptimConfig(schedule='exponential', end_lr_fraction=0.0), 1000)
  with pytest.raises(ConfigError, match='wsd_decay_fraction'):
    make_schedule(cfg('wsd', wsd_decay_fraction=0.95), TOTAL)
  with pytest.raises(ConfigError, match=r"unknown config key 'optim.lr'"):
    from_dict(OptimConfig, {'lr': 1.0}, prefix='optim')
