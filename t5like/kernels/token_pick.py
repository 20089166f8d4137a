"""Greedy token choice on CPU through XLA FFI (see token_pick.cc).

`greedy(logits_BV)` -> (token [B] int32, log-probability [B] float32): the first index of each
row's maximum (0 for a row holding NaN, as `t5like.infer.sampling.argmax`) and its log-softmax
value, in one pass for the maximum and one for the normaliser. `wanted(logits)` says whether it
may be used here (at trace time): float32 [B, V], `library.usable()`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from t5like.kernels import library

_TARGET = 't5like_greedy_pick'


def wanted(logits_BV) -> bool:
  return logits_BV.ndim == 2 and logits_BV.dtype == jnp.float32 and library.usable()


def greedy(logits_BV):
  if logits_BV.ndim != 2 or logits_BV.shape[1] < 1:
    raise ValueError(f'greedy: logits must be [B, V] with V >= 1, got {logits_BV.shape}')
  if not library.available():
    raise RuntimeError(f'CPU kernels unavailable: {library.unavailable_reason()}')
  B = logits_BV.shape[0]
  call = jax.ffi.ffi_call(_TARGET, (jax.ShapeDtypeStruct((B,), jnp.int32),
                                    jax.ShapeDtypeStruct((B,), jnp.float32)),
                          vmap_method='sequential')
  return call(logits_BV.astype(jnp.float32))
