"""Mixed-precision policies: the dtype of parameters, of compute, and of outputs.

Norm statistics, softmax and logits are always computed in float32 whatever the policy; modules
read `policy.compute_dtype` for matmul inputs and cast parameters at use, so master weights stay
in `param_dtype`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  param_dtype: jnp.dtype
  compute_dtype: jnp.dtype
  output_dtype: jnp.dtype        # dtype of the logits
  loss_scaling: bool = False     # fp16 needs dynamic loss scaling

  def cast_to_compute(self, x):
    return x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  def cast_to_param(self, x):
    return x.astype(self.param_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


POLICIES = {
    'f32': Policy('f32', jnp.float32, jnp.float32, jnp.float32),
    'bf16': Policy('bf16', jnp.float32, jnp.bfloat16, jnp.float32),
    'pure_bf16': Policy('pure_bf16', jnp.bfloat16, jnp.bfloat16, jnp.float32),
    'fp16': Policy('fp16', jnp.float32, jnp.float16, jnp.float32, loss_scaling=True),
}


def get_policy(name: str) -> Policy:
  if name not in POLICIES:
    raise ValueError(f'unknown precision policy {name!r}; choose one of {sorted(POLICIES)}')
  return POLICIES[name]


# Dynamic loss scaling for 'fp16'. Optax has `apply_if_finite` but no loss scale, and jmp (which has
# one) is not a dependency, so it is written here: a pytree that lives in the train state and the
# checkpoint. The train step, with `ls = state.loss_scale`:
#
#   grads = jax.grad(lambda p: ls.scale(loss_fn(p)))(params)
#   grads = ls.unscale(grads)
#   finite = all_finite(grads)
#   updates, new_opt = tx.update(grads, opt_state, params)
#   params = select_tree(finite, optax.apply_updates(params, updates), params)
#   opt_state = select_tree(finite, new_opt, opt_state)
#   ls = ls.adjust(finite)
#
# `NoOpLossScale` has the same methods and does nothing, for the other policies.

def all_finite(tree) -> jax.Array:
  """A scalar bool: every element of every floating leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def select_tree(pred, on_true, on_false):
  """Leafwise `on_true if pred else on_false` for two pytrees of the same structure (jittable)."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@struct.dataclass
class DynamicLossScale:
  """Loss scale that doubles after `period` finite steps and halves on an overflowing step.

  `loss_scale` (f32), `counter` (finite steps since the last change) and `skipped` (overflowing
  steps so far) are arrays, so the scale checkpoints with the train state; `period`, `factor`,
  `min_loss_scale` and `max_loss_scale` are static.
  """
  loss_scale: jax.Array
  counter: jax.Array
  skipped: jax.Array
  period: int = struct.field(pytree_node=False, default=2000)
  factor: float = struct.field(pytree_node=False, default=2.0)
  min_loss_scale: float = struct.field(pytree_node=False, default=1.0)
  max_loss_scale: float = struct.field(pytree_node=False, default=2.0 ** 24)

  @classmethod
  def create(cls, initial_scale: float = 2.0 ** 15, period: int = 2000, factor: float = 2.0,
             min_loss_scale: float = 1.0, max_loss_scale: float = 2.0 ** 24) -> 'DynamicLossScale':
    if period <= 0:
      raise ValueError(f'DynamicLossScale: period must be positive, got {period}')
    if factor <= 1.0:
      raise ValueError(f'DynamicLossScale: factor must be > 1, got {factor}')
    if not 0 < min_loss_scale <= initial_scale <= max_loss_scale:
      raise ValueError(f'DynamicLossScale: need 0 < min_loss_scale ({min_loss_scale}) <= '
                       f'initial_scale ({initial_scale}) <= max_loss_scale ({max_loss_scale})')
    return cls(loss_scale=jnp.asarray(initial_scale, jnp.float32),
               counter=jnp.zeros([], jnp.int32), skipped=jnp.zeros([], jnp.int32),
               period=period, factor=factor, min_loss_scale=min_loss_scale,
               max_loss_scale=max_loss_scale)

  def scale(self, loss):
    """The loss times the scale (differentiate this)."""
    return loss * self.loss_scale.astype(jnp.asarray(loss).dtype)

  def unscale(self, grads):
    """Gradients divided by the scale, computed in f32 and cast back to each leaf's dtype."""
    inv = 1.0 / self.loss_scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)

  def adjust(self, grads_finite) -> 'DynamicLossScale':
    """The scale for the next step: halve (and count a skip) on overflow, grow after `period`."""
    grads_finite = jnp.asarray(grads_finite)
    grow = jnp.logical_and(grads_finite, self.counter + 1 >= self.period)
    scale = jnp.where(grads_finite,
                      jnp.where(grow, self.loss_scale * self.factor, self.loss_scale),
                      self.loss_scale / self.factor)
    scale = jnp.clip(scale, self.min_loss_scale, self.max_loss_scale).astype(jnp.float32)
    counter = jnp.where(grads_finite & ~grow, self.counter + 1, 0).astype(jnp.int32)
    return self.replace(loss_scale=scale, counter=counter,
                        skipped=self.skipped + (~grads_finite).astype(jnp.int32))


@struct.dataclass
class NoOpLossScale:
  """The loss-scale interface for policies without loss scaling: every method is the identity."""
  skipped: jax.Array = struct.field(default_factory=lambda: jnp.zeros([], jnp.int32))

  @property
  def loss_scale(self):
    return jnp.ones([], jnp.float32)

  def scale(self, loss):
    return loss

  def unscale(self, grads):
    return grads

  def adjust(self, grads_finite) -> 'NoOpLossScale':
    del grads_finite
    return self


def make_loss_scale(policy: Policy, **kwargs):
  """`DynamicLossScale.create(**kwargs)` if `policy.loss_scaling` ('fp16'), else `NoOpLossScale()`."""
  if policy.loss_scaling:
    return DynamicLossScale.create(**kwargs)
  if kwargs:
    raise ValueError(f'make_loss_scale: policy {policy.name!r} has no loss scaling; got options '
                     f'{sorted(kwargs)}')
  return NoOpLossScale()
