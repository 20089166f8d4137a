"""Pipeline parallelism over the mesh axis 'stage' for an nn.scan layer stack.

The stack's parameters keep their single-device layout, leading axis G (layer groups, logical name
'layers', which the pp_* rule presets map to 'stage'), so checkpoints and the HF converter do not
care whether a run was pipelined. Written here, after MaxText's `pipeline.py` (read, not copied):
the whole schedule is one SPMD program, with no per-device code.

Schedule, with S stages, M microbatches, R repeats (circular / interleaved when R > 1):
- The G groups are cut into S * R chunks of C = G / (S R) consecutive groups; chunk r * S + s runs
  on stage s in repeat r. The parameters are viewed as [S, R, C, ...], stage axis sharded over
  'stage'. For R = 1 (GPipe) this view is free; for R > 1 it moves (R - 1) / R of each stage's
  stack weights between stages once per step (the price of keeping the single-device layout).
- Work item k = r * M + m is microbatch m in repeat r. At iteration t, stage s runs item t - s
  (when 0 <= t - s < M R), so a step takes M R + S - 1 iterations and each stage idles for S - 1
  of them: bubble fraction (S - 1) / (M R + S - 1); GPipe (R = 1): (S - 1) / (M + S - 1).
- Stage outputs move to the next stage with a roll of the [S, mb, ...] state (a collective
  permute over 'stage'). The last stage writes item k into slot k mod M of a buffer that first
  holds the inputs; stage 0 reads item k from that slot. Item k - M (the same microbatch, one
  repeat earlier) was written at iteration k - M + S - 1, before k, only if M >= S: circular
  schedules need at least as many microbatches as stages.
- Microbatch m is rows m, m + M, m + 2M, ... of the batch, so splitting a batch that is sharded
  over ('data', 'fsdp') moves no data; each microbatch is still split over ('data', 'fsdp').

Every per-example argument of the layers (attention biases, encoder outputs: leading dimension B)
is split the same way; the others are broadcast. Dropout keys are folded per (item, layer) and so
differ from those of the unpipelined stack.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from t5like.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A pipeline schedule: `stages` (mesh 'stage' size), `microbatches` per step, `repeats`."""
  stages: int
  microbatches: int
  repeats: int = 1

  def __post_init__(self):
    for f in ('stages', 'microbatches', 'repeats'):
      if getattr(self, f) < 1:
        raise ConfigError(f'pipeline {f} must be >= 1, got {getattr(self, f)}')
    if self.repeats > 1 and self.microbatches < self.stages:
      raise ConfigError(f'a circular pipeline (mesh.pipeline_repeats={self.repeats}) needs '
                        f'mesh.num_microbatches >= mesh.stage, got {self.microbatches} < '
                        f'{self.stages}')

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    return bubble_fraction(self.stages, self.microbatches, self.repeats)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle fraction of each stage: (S - 1) / (M R + S - 1)."""
  return (stages - 1) / (microbatches * repeats + stages - 1)


_ACTIVE = threading.local()


@contextlib.contextmanager
def schedule(s: Schedule):
  """Within this context, LayerStacks' whole-sequence calls run as pipelines with schedule `s`."""
  stack = _ACTIVE.__dict__.setdefault('stack', [])
  stack.append(s)
  try:
    yield s
  finally:
    stack.pop()


def active_schedule() -> Schedule | None:
  stack = _ACTIVE.__dict__.get('stack', [])
  return stack[-1] if stack else None


def maybe_pipeline(stack_module: nn.Module, group: nn.Module, x, broadcast_args,
                   deterministic: bool):
  """The whole-sequence output of `stack_module` (a LayerStack) run as a pipeline, or None where
  it does not apply: no active schedule, or initialisation (which creates the scanned
  parameters). `group` is the unbound scanned layer group, called as
  `group(x, None, deterministic, *broadcast_args)`."""
  s = active_schedule()
  if s is None or stack_module.is_initializing():
    return None
  rng = None if deterministic else stack_module.make_rng('dropout')
  params = stack_module.variables['params']['layers']
  return run_stack(group, params, x, (deterministic,) + tuple(broadcast_args), s, rng)


def _constrain(x, lead: str | None):
  """Logical constraint on [lead, mb, ..., D]: a leading stage / microbatch axis, then an
  activation whose first axis is the (micro)batch and whose last is the model dimension."""
  middle = (None,) * (x.ndim - 3)
  return nn.with_logical_constraint(x, (lead, 'batch') + middle + ('embed',))


def run_stack(group: nn.Module, params, x, broadcast_args: tuple, s: Schedule, rng=None):
  """Applies the G scanned groups `params` (leaves [G, ...]) to x [B, ...] as a pipeline."""
  mesh = jax.sharding.get_abstract_mesh()
  mesh_stages = 1 if mesh.empty else dict(mesh.shape).get('stage', 1)
  if mesh_stages != s.stages:
    raise ConfigError(f'the pipeline schedule has {s.stages} stages but the active mesh has '
                      f"'stage'={mesh_stages}; trace under t5like.parallel.mesh.activate(mesh, "
                      'rules, mesh_cfg)')
  params = nn.unbox(params)
  S, M, R = s.stages, s.microbatches, s.repeats
  G = jax.tree.leaves(params)[0].shape[0]
  if G % (S * R):
    raise ConfigError(f'{G} layer groups cannot be cut into stages x repeats = {S} x {R} chunks')
  C = G // (S * R)
  B = x.shape[0]
  if B % M:
    raise ConfigError(f'batch {B} is not divisible by mesh.num_microbatches={M}')
  mb = B // M

  # [G, ...] -> [S, R, C, ...]: chunk r * S + s on stage s.
  def to_stages(a):
    a = a.reshape((R, S, C) + a.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(a, P('stage', *([P.UNCONSTRAINED] * (a.ndim - 1))))
  params_S = jax.tree.map(to_stages, params)

  split = lambda a: a.reshape((mb, M) + a.shape[1:]).swapaxes(0, 1)  # [B] -> [M, mb]
  per_example = lambda a: hasattr(a, 'ndim') and a.ndim >= 1 and a.shape[0] == B
  args_M = jax.tree.map(lambda a: split(a) if per_example(a) else a, broadcast_args)
  args_axes = jax.tree.map(lambda a: 0 if per_example(a) else None, broadcast_args)

  def stage_fn(p_RC, r, x_mb, args, k, stage):
    p_C = jax.tree.map(lambda a: a[r], p_RC)

    def layer(h, p_and_c):
      p, c = p_and_c
      rngs = None
      if rng is not None:
        rngs = {'dropout': jax.random.fold_in(jax.random.fold_in(rng, k), (r * S + stage) * C + c)}
      h, _ = group.apply({'params': p}, h, None, *args, rngs=rngs)
      return h, None

    h, _ = jax.lax.scan(layer, x_mb, (p_C, jnp.arange(C)))
    return h

  stages_fn = jax.vmap(stage_fn, in_axes=(0, 0, 0, args_axes, 0, 0), spmd_axis_name='stage')
  stage_ids = jnp.arange(S)

  def iteration(carry, t):
    state, io = carry
    k = t - stage_ids                                   # work item of each stage
    kc = jnp.clip(k, 0, M * R - 1)
    m, r = kc % M, kc // M
    first = jax.lax.dynamic_index_in_dim(io, t % M, 0, keepdims=True)
    inputs = jnp.where((stage_ids == 0).reshape((S,) + (1,) * (state.ndim - 1)), first, state)
    inputs = _constrain(inputs, 'layers')
    args = jax.tree.map(lambda a, ax: a if ax is None else jnp.take(a, m, axis=0),
                        args_M, args_axes)
    out = _constrain(stages_fn(params_S, r, inputs, args, k, stage_ids), 'layers')
    k_last = t - (S - 1)
    slot = jnp.maximum(k_last, 0) % M
    old = jax.lax.dynamic_index_in_dim(io, slot, 0, keepdims=False)
    io = jax.lax.dynamic_update_index_in_dim(io, jnp.where(k_last >= 0, out[S - 1], old), slot, 0)
    state = jnp.roll(out, 1, axis=0)
    return (state, _constrain(io, None)), None

  io = _constrain(split(x), None)
  state = jnp.zeros((S,) + io.shape[1:], io.dtype)
  (_, io), _ = jax.lax.scan(iteration, (state, io), jnp.arange(s.iterations))
  return io.swapaxes(0, 1).reshape(x.shape)                    # [M, mb] -> [B]


def describe(s: Schedule) -> dict[str, Any]:
  """The numbers a log line or report wants about a schedule."""
  return {'stages': s.stages, 'microbatches': s.microbatches, 'repeats': s.repeats,
          'iterations': s.iterations, 'bubble_fraction': round(s.bubble_fraction, 4)}
