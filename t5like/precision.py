"""Mixed-precision policies: the dtype of parameters, of compute, and of outputs.

Norm statistics, softmax and logits are always computed in float32 whatever the policy; modules
read `policy.compute_dtype` for matmul inputs and cast parameters at use, so master weights stay
in `param_dtype`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


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
