"""CPU attention kernels against XLA's ops, for the shapes of t5_small decoding.

  python scripts/bench.py attention [--batch=8] [--length=128] [--repeats=20]

Prints one JSON object: milliseconds per call (median, the two forms' calls alternating) of
(1) a prefill's attention (an encoder layer: every query over `length` keys), as
`decode_attention.attend_prefill` and as the einsum / softmax / einsum XLA runs otherwise, and
(2) a decoding step's self-attention with its cache write, as `decode_attention.attend_cached` and
as XLA's scatter + einsums: `steps` steps in a `fori_loop` carrying a cache `length` long (filled
from the middle on, as a decoding loop does), per step. Each pair's outputs are checked to agree
first.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from t5like.kernels import decode_attention
from t5like.models.attention import write_cache

import benchlib


def add_args(parser):
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--steps', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=20)


def _xla_prefill(q, k, v, bias):
  logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) + bias
  return jnp.einsum('BNTS,BSNH->BTNH', jax.nn.softmax(logits, axis=-1), v)


def _xla_cached(q, k_new, v_new, keys, values, bias, index):
  keys = write_cache(keys, k_new[:, None], index, keys=True)
  values = write_cache(values, v_new[:, None], index, keys=False)
  logits = jnp.einsum('BNH,BNHS->BNS', q, keys) + bias
  return jnp.einsum('BNS,BNSH->BNH', jax.nn.softmax(logits, axis=-1), values), keys, values


def _alternate(pairs: dict, repeats: int) -> dict:
  times = {name: [] for name in pairs}
  for _ in range(repeats):
    for name, call in pairs.items():
      t = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t)
  return {name: round(1e3 * benchlib.median(ts), 3) for name, ts in times.items()}


def run(args) -> dict:
  if not decode_attention.library.available():
    raise SystemExit(f'CPU kernels unavailable: {decode_attention.library.unavailable_reason()}')
  B, S, N, H = args.batch, args.length, args.heads, args.head_dim
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = normal(B, S, N, H), normal(B, S, N, H), normal(B, S, N, H)
  bias = normal(1, N, S, S)
  prefill = {'kernel': jax.jit(decode_attention.attend_prefill), 'xla': jax.jit(_xla_prefill)}
  outs = {name: f(q, k, v, bias) for name, f in prefill.items()}
  np.testing.assert_allclose(outs['kernel'], outs['xla'], rtol=1e-4, atol=1e-4)
  prefill_ms = _alternate({name: (lambda f=f: f(q, k, v, bias)) for name, f in prefill.items()},
                          args.repeats)

  q1, k1, v1 = normal(B, N, H), normal(B, N, H), normal(B, N, H)
  keys, values = normal(B, N, H, S), normal(B, N, S, H)
  start, steps = S // 2, min(args.steps, S - S // 2)

  def loop(attend):
    def run_steps(keys, values):
      def body(i, carry):
        keys, values, acc = carry
        bias = jnp.where(jnp.arange(S) <= i, 0.0, -1e10)[None, None]
        ctx, keys, values = attend(q1, k1 + i, v1 - i, keys, values, bias,
                                   jnp.full((B,), i, jnp.int32))
        return keys, values, acc + ctx
      return jax.lax.fori_loop(start, start + steps, body, (keys, values, jnp.zeros_like(q1)))
    return jax.jit(run_steps)
  step = {'kernel': loop(decode_attention.attend_cached), 'xla': loop(_xla_cached)}
  outs = {name: f(keys, values) for name, f in step.items()}
  for got, want in zip(outs['kernel'], outs['xla']):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  loop_ms = _alternate({name: (lambda f=f: f(keys, values)) for name, f in step.items()},
                       args.repeats)
  step_ms = {name: round(ms / steps, 3) for name, ms in loop_ms.items()}
  return {'benchmark': 'attention', 'batch': B, 'length': S, 'heads': N, 'head_dim': H,
          'prefill_ms': prefill_ms, 'prefill_speedup': round(prefill_ms['xla'] /
                                                             prefill_ms['kernel'], 2),
          'steps': steps, 'step_ms': step_ms,
          'step_speedup': round(step_ms['xla'] / step_ms['kernel'], 2)}
