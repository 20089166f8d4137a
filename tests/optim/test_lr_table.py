"""The learning rate as data (t5like.optim.lr_table): a unit-rate optimizer times a per-step table
equals make_optimizer at that rate and schedule, and a wrong table is caught."""
import dataclasses

import numpy as np
import pytest

from t5like.config import OptimConfig
from t5like.optim.lr_table import Plan, check_equivalence, plan

STEPS = 12


@pytest.mark.parametrize('name,schedule,tabulate', [
    ('adamw', 'cosine', False), ('adamw', 'cosine', True), ('adafactor', 'linear', True),
    ('sgd', 'exponential', True), ('lars', 'cosine', False), ('agd', 'constant', False)])
def test_plan_equals_make_optimizer(name, schedule, tabulate):
  optim = OptimConfig(name=name, learning_rate=0.05, schedule=schedule, warmup_steps=3)
  p = plan(optim, STEPS, tabulate)
  assert p.inner.learning_rate == 1.0 and p.table.shape == (STEPS,)
  if tabulate and name != 'lars':
    assert p.inner.schedule == 'constant' and len(set(p.table.tolist())) > 2   # the schedule's shape
  else:
    assert np.all(p.table == np.float32(0.05))
  assert check_equivalence(optim, p, STEPS) <= 1e-4


def test_a_wrong_table_is_caught():
  optim = OptimConfig(name='adamw', learning_rate=0.05, schedule='cosine', warmup_steps=3)
  p = plan(optim, STEPS, True)
  with pytest.raises(AssertionError, match='differs from make_optimizer'):
    check_equivalence(optim, Plan(p.inner, p.table * 1.5), STEPS)
  with pytest.raises(AssertionError, match='differs from make_optimizer'):
    check_equivalence(optim, dataclasses.replace(p, inner=dataclasses.replace(
        p.inner, name='sgd')), STEPS)
