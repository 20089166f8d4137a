"""One-query attention over a KV cache on CPU, through XLA FFI (see decode_attention.cc).

`attend(q_BNH, keys_BNHS, values_BNSH, bias_BNS)` is softmax(q . k + bias) . v per (row, head),
float32, in the cache layouts of t5like/models/attention.py. `wanted(...)` says whether a model's
attention call may use it here: float32, one query, inside `library.enabled()`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from t5like.kernels import library

_TARGET = 't5like_decode_attention'


def wanted(q_BTNH, keys, values) -> bool:
  return (q_BTNH.shape[1] == 1 and all(a.dtype == jnp.float32 for a in (q_BTNH, keys, values))
          and library.active())


def attend(q_BNH, keys_BNHS, values_BNSH, bias_BNS):
  """Context [B, N, H]; bias may be any shape that broadcasts to [B, N, S]."""
  B, N, H = q_BNH.shape
  S = keys_BNHS.shape[-1]
  if keys_BNHS.shape != (B, N, H, S) or values_BNSH.shape != (B, N, S, H):
    raise ValueError(f'attend: q {q_BNH.shape}, keys {keys_BNHS.shape} and values '
                     f'{values_BNSH.shape} are not [B,N,H], [B,N,H,S], [B,N,S,H]')
  if not library.available():
    raise RuntimeError(f'CPU kernels unavailable: {library.unavailable_reason()}')
  bias = jnp.broadcast_to(bias_BNS.astype(jnp.float32), (B, N, S))
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((B, N, H), jnp.float32),
                          vmap_method='sequential')
  return call(q_BNH.astype(jnp.float32), keys_BNHS, values_BNSH, bias)
