"""Greedy structured pruning: repeatedly remove the unit whose removal raises the loss least.

Units are attention heads (one per layer and head; a head of a self-attention stack sharing one
relative-bias table is one unit across all layers when `PruneConfig.tie_relpos_heads`) and groups
of FFN neurons. Neuron groups hold `PruneConfig.greedy_neuron_group` neurons (default: as many
weights as one head, so every candidate removes about as many weights): within each layer the
neurons are sorted by their L2 norm and cut into consecutive groups, weakest first.

Every step evaluates the calibration loss with each remaining candidate removed (on top of all
removals so far) and removes the argmin: O(units^2) loss evaluations, meant for small models and
a few calibration batches. Written here: no library does greedy head / neuron removal in JAX.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5like.compress import prune
from t5like.config import PruneConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Unit:
  module: str
  layers: tuple[int, ...]
  indices: tuple[int, ...]
  size: int                     # weights removed with it

  def describe(self) -> str:
    kind = 'head' if self.module.endswith('attention') else 'neurons'
    layers = 'all' if len(self.layers) > 1 else str(self.layers[0])
    idx = self.indices[0] if len(self.indices) == 1 else f'{len(self.indices)} from {self.indices[0]}'
    return f'{self.module}[layer {layers}] {kind} {idx}'


def candidate_units(params, cfg: PruneConfig) -> list[Unit]:
  """The units greedy may remove (see the module docstring)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  modules = prune.unit_modules(params, cfg)
  tied = set(prune.relpos_tied_modules(params, modules)) if cfg.tie_relpos_heads else set()
  per_unit = {}
  for mod in modules:
    members = prune.unit_members(flat, mod)
    per_unit[mod] = sum(flat[p].size // (flat[p].shape[0] * flat[p].shape[a]) for p, a in members)
  head_size = max([per_unit[m] for m in modules if m in _heads(flat, modules)], default=0)
  units = []
  norms = prune.aggregate_units(params, modules, 'l2')
  for mod in modules:
    L, U = norms[mod].shape
    if mod in _heads(flat, modules):
      if mod in tied:
        units += [Unit(mod, tuple(range(L)), (n,), L * per_unit[mod]) for n in range(U)]
      else:
        units += [Unit(mod, (l,), (n,), per_unit[mod]) for l in range(L) for n in range(U)]
      continue
    g = cfg.greedy_neuron_group or (max(1, round(head_size / per_unit[mod])) if head_size
                                    else max(1, U // 8))
    for l in range(L):
      order = np.argsort(np.asarray(norms[mod][l]), stable=True)
      for start in range(0, U, g):
        idx = tuple(int(i) for i in sorted(order[start:start + g]))
        units.append(Unit(mod, (l,), idx, len(idx) * per_unit[mod]))
  return units


def _heads(flat, modules):
  return [m for m in modules if f'{m}/query/kernel' in flat]


def greedy_masks(params, loss_fn: Callable, batches: Sequence,
                 cfg: PruneConfig = PruneConfig(method='greedy'), fraction=None):
  """Parameter masks of one greedy run to `fraction` (default `cfg.sparsity`) of the units'
  weights (see `greedy_unit_masks`)."""
  fraction = cfg.sparsity if fraction is None else fraction
  um, _ = greedy_unit_masks(params, loss_fn, batches, [fraction], cfg)
  return prune.expand_unit_masks(params, um[0])


def greedy_unit_masks(params, loss_fn: Callable, batches: Sequence, fractions: Sequence[float],
                      cfg: PruneConfig = PruneConfig(method='greedy'),
                      units: Sequence[Unit] | None = None):
  """Unit masks at each of `fractions` (ascending) of one greedy run, and its history.

  loss_fn(params, batch) -> scalar; `batches`: the calibration batches (all used every step).
  The masks at fraction f are those of the first step that removed >= round(f * n) of the n
  weights the candidate units span. History: [{'unit', 'loss', 'fraction'}] in removal order.
  """
  batches = list(batches)
  if not batches:
    raise ValueError('greedy_unit_masks: the calibration batches are empty')
  fractions = list(fractions)
  if fractions != sorted(fractions):
    raise ValueError(f'greedy_unit_masks: fractions must be ascending, got {fractions}')
  units = list(candidate_units(params, cfg) if units is None else units)
  modules = sorted({u.module for u in units})
  flat = traverse_util.flatten_dict(params, sep='/')
  shapes = {m: prune.aggregate_units(params, [m], 'sum')[m].shape for m in modules}
  total = sum(flat[p].size for m in modules for p, _ in prune.unit_members(flat, m))

  @jax.jit
  def eval_loss(unit_masks, batches):
    masked = prune.apply_masks(params, prune.expand_unit_masks(params, unit_masks))
    return jnp.mean(jnp.stack([loss_fn(masked, b) for b in batches]))

  current = {m: np.ones(shapes[m], bool) for m in modules}

  def without(u: Unit):
    um = {m: v.copy() for m, v in current.items()}
    um[u.module][np.ix_(u.layers, u.indices)] = False
    return um

  out, history, removed = [], [], 0
  targets = [int(round(f * total)) for f in fractions]
  remaining = list(units)
  t0 = time.time()
  while len(out) < len(targets):
    while len(out) < len(targets) and removed >= targets[len(out)]:
      out.append({m: jnp.asarray(v) for m, v in current.items()})
    if len(out) == len(targets):
      break
    if not remaining:
      raise ValueError(f'greedy: no units left but {removed}/{total} weights removed; the '
                       f'target fraction {fractions[len(out)]} is unreachable')
    losses = [float(eval_loss(without(u), batches)) for u in remaining]
    best = int(np.argmin(losses))
    u = remaining.pop(best)
    current = without(u)
    removed += u.size
    history.append({'unit': u.describe(), 'loss': losses[best], 'fraction': removed / total})
    log.info('greedy: removed %s (loss %.4f, %.1f%% of unit weights, %.0fs)', u.describe(),
             losses[best], 100 * removed / total, time.time() - t0)
  return out, history
