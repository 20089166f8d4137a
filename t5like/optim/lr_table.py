"""An optimizer whose learning rate is data: `make_optimizer(config with learning_rate=1)` chained
with a multiplier read from the optimizer state, one value per step.

Every optimizer here ends in `scale_by_learning_rate` (LARS: a momentum trace after it, which is
linear), so scaling the unit-rate update by lr_t equals the library optimizer at rate lr_t, and one
compiled train step serves every rate, seed and (all but LARS) schedule: what a fair sweep on a
small machine needs. `plan` splits a config into the compiled part and the table;
`check_equivalence` verifies a plan against `make_optimizer(config)` on a small tree.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5like.config import OptimConfig
from t5like.optim.optimizers import make_optimizer
from t5like.optim.schedules import make_schedule


class LrTableState(NamedTuple):
  table: jax.Array      # f32 [num_steps]: the multiplier of update t
  count: jax.Array      # int32 updates so far


def scale_by_lr_table(num_steps: int) -> optax.GradientTransformation:
  """Multiplies update t by `table[t]` (the last entry after the table ends); the table is data
  in the state, so one compiled step serves every rate."""
  def init(params):
    del params
    return LrTableState(jnp.ones([num_steps], jnp.float32), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    lr = state.table[jnp.minimum(state.count, num_steps - 1)]
    return (jax.tree.map(lambda u: u * lr.astype(u.dtype), updates),
            LrTableState(state.table, state.count + 1))

  return optax.GradientTransformation(init, update)


def with_table(opt_state, table):
  """The optimizer state (a chain: inner, LrTableState) with the multiplier table replaced."""
  inner, last = opt_state
  return (inner, LrTableState(jnp.asarray(table, jnp.float32), last.count))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one run's optimizer is realised: `inner` (compiled) and the multiplier `table`."""
  inner: OptimConfig
  table: np.ndarray


def plan(optim: OptimConfig, num_steps: int, tabulate_schedule: bool) -> Plan:
  """The inner unit-rate optimizer and the table for `optim` (module docstring)."""
  lr = optim.learning_rate
  if tabulate_schedule and optim.name != 'lars':
    table = np.asarray(jax.device_get(make_schedule(optim, num_steps)(jnp.arange(num_steps))),
                       np.float32)
    inner = dataclasses.replace(optim, learning_rate=1.0, schedule='constant', warmup_steps=0)
  else:
    table = np.full([num_steps], lr, np.float32)
    inner = dataclasses.replace(optim, learning_rate=1.0)
  return Plan(inner, table)


def check_equivalence(optim: OptimConfig, p: Plan, num_steps: int) -> float:
  """Max relative parameter difference after `num_steps` updates (on a small quadratic, with
  gradients that vary) between `make_optimizer(optim)` and the plan; raises above 1e-4."""
  key = jax.random.key(0)
  params = {'a': {'kernel': jax.random.normal(key, (8, 4))},
            'b': {'scale': jnp.linspace(0.5, 1.5, 6)}}
  target = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape),
                        params)

  def loss(ps, t):
    return sum(jnp.sum((1.0 + 0.1 * t) * (a - b) ** 2) for a, b in
               zip(jax.tree.leaves(ps), jax.tree.leaves(target)))

  def run(tx, state_fn):
    @jax.jit
    def step(ps, st, t):
      up, st = tx.update(jax.grad(loss)(ps, t), st, ps)
      return optax.apply_updates(ps, up), st

    ps, st = params, state_fn(tx.init(params))
    for t in range(num_steps):
      ps, st = step(ps, st, jnp.float32(t))
    return ps

  direct = run(make_optimizer(optim, None, num_steps), lambda s: s)
  tx = optax.chain(make_optimizer(p.inner, None, num_steps), scale_by_lr_table(num_steps))
  planned = run(tx, lambda s: with_table(s, p.table))
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(direct),
                                                          jax.tree.leaves(params)))
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(direct),
                                                         jax.tree.leaves(planned)))
  rel = diff / max(moved, 1e-12)
  if rel > 1e-4:
    raise AssertionError(f'the lr-table realisation of {optim.name}/{optim.schedule} differs from '
                         f'make_optimizer by {rel:.2e} (relative to the parameter change)')
  return rel
