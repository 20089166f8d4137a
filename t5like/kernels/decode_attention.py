"""One-query attention over a KV cache on CPU, through XLA FFI (see decode_attention.cc).

`attend(q_BNH, keys_BNHS, values_BNSH, bias_BNS)` is softmax(q . k + bias) . v per (row, head),
float32, in the cache layouts of t5like/models/attention.py. `attend_cached(...)` first writes the
step's keys and values into a self-attention cache in place (no separate scatter, which XLA runs
as one strided write per key element) and reads only the positions up to each row's own.
`attend_prefill(q_BTNH, k_BSNH, v_BSNH, bias_BNTS)` is the same for every query of a prefill (an
encoder, a prompt) in the training layouts; XLA:CPU runs that attention at a few GFLOP/s.
`wanted(...)` and `wanted_prefill(...)` say whether an attention call may use them here (at trace
time): float32, one query (or several), `library.usable()`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from t5like.kernels import library

_TARGET = 't5like_decode_attention'
_CACHED_TARGET = 't5like_decode_attention_cached'
_PREFILL_TARGET = 't5like_prefill_attention'


def wanted(q_BTNH, keys, values) -> bool:
  return (q_BTNH.shape[1] == 1 and all(a.dtype == jnp.float32 for a in (q_BTNH, keys, values))
          and library.usable())


def wanted_prefill(q_BTNH, k_BSNH, v_BSNH) -> bool:
  return (q_BTNH.ndim == 4 and q_BTNH.shape[1] > 1
          and all(a.dtype == jnp.float32 for a in (q_BTNH, k_BSNH, v_BSNH)) and library.usable())


def _check(name, q_BNH, keys_BNHS, values_BNSH):
  B, N, H = q_BNH.shape
  S = keys_BNHS.shape[-1]
  if keys_BNHS.shape != (B, N, H, S) or values_BNSH.shape != (B, N, S, H):
    raise ValueError(f'{name}: q {q_BNH.shape}, keys {keys_BNHS.shape} and values '
                     f'{values_BNSH.shape} are not [B,N,H], [B,N,H,S], [B,N,S,H]')
  if not library.available():
    raise RuntimeError(f'CPU kernels unavailable: {library.unavailable_reason()}')
  return B, N, H, S


def attend(q_BNH, keys_BNHS, values_BNSH, bias_BNS):
  """Context [B, N, H]; bias may be any shape that broadcasts to [B, N, S]."""
  B, N, H, S = _check('attend', q_BNH, keys_BNHS, values_BNSH)
  bias = jnp.broadcast_to(bias_BNS.astype(jnp.float32), (B, N, S))
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((B, N, H), jnp.float32),
                          vmap_method='sequential')
  return call(q_BNH.astype(jnp.float32), keys_BNHS, values_BNSH, bias)


def attend_cached(q_BNH, new_keys_BNH, new_values_BNH, keys_BNHS, values_BNSH, bias_BNS, index_B):
  """Causal self-attention of one new position per row over its cache.

  Writes each row's new key and value at position index_B[b] (dropped past the end), then
  attends over positions 0..index_B[b]; later positions must be masked by `bias` (as causal
  attention does), since they are not read. Returns (context [B, N, H], keys, values), the cache
  updated in place.
  """
  B, N, H, S = _check('attend_cached', q_BNH, keys_BNHS, values_BNSH)
  if new_keys_BNH.shape != (B, N, H) or new_values_BNH.shape != (B, N, H):
    raise ValueError(f'attend_cached: new keys {new_keys_BNH.shape} and values '
                     f'{new_values_BNH.shape} are not [B,N,H] = {(B, N, H)}')
  bias = jnp.broadcast_to(bias_BNS.astype(jnp.float32), (B, N, S))
  call = jax.ffi.ffi_call(
      _CACHED_TARGET, (jax.ShapeDtypeStruct((B, N, H), jnp.float32),
                       jax.ShapeDtypeStruct(keys_BNHS.shape, jnp.float32),
                       jax.ShapeDtypeStruct(values_BNSH.shape, jnp.float32)),
      input_output_aliases={3: 1, 4: 2}, vmap_method='sequential')
  return call(q_BNH.astype(jnp.float32), new_keys_BNH.astype(jnp.float32),
              new_values_BNH.astype(jnp.float32), keys_BNHS, values_BNSH, bias,
              jnp.broadcast_to(index_B, (B,)).astype(jnp.int32))


def attend_prefill(q_BTNH, k_BSNH, v_BSNH, bias_BNTS):
  """Context [B, T, N, H] of every query; bias may be any shape that broadcasts to [B, N, T, S]."""
  B, T, N, H = q_BTNH.shape
  S = k_BSNH.shape[1]
  if k_BSNH.shape != (B, S, N, H) or v_BSNH.shape != (B, S, N, H):
    raise ValueError(f'attend_prefill: q {q_BTNH.shape}, k {k_BSNH.shape} and v {v_BSNH.shape} '
                     'are not [B,T,N,H], [B,S,N,H], [B,S,N,H]')
  if not library.available():
    raise RuntimeError(f'CPU kernels unavailable: {library.unavailable_reason()}')
  bias = jnp.broadcast_to(bias_BNTS.astype(jnp.float32), (B, N, T, S))
  call = jax.ffi.ffi_call(_PREFILL_TARGET, jax.ShapeDtypeStruct((B, T, N, H), jnp.float32),
                          vmap_method='sequential')
  return call(q_BTNH, k_BSNH, v_BSNH, bias)
