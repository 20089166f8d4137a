"""Decoding speed of quantised weights / activations against float32 (JSON on stdout).

  .venv/bin/python scripts/bench_quant.py --variant=t5_small --batch=1 --new_tokens=32

`quant(...)` is the `quant` subcommand of scripts/bench.py once that dispatcher exists. Greedy
decoding with the KV cache (`t5like.infer.decode.greedy`, no early stop) of random-weight models;
each setting is compiled first and timed over `repeats` runs (median). Ratios are against 'f32'
in the same run. Settings: f32; int8 weights (per channel, weight-only); int8 weights + dynamic
int8 activations (int8 x int8 -> int32); int4 weights (group 128, weight-only); f32 weights +
dynamic int8 (both quantised on the fly).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {
    'f32': dict(scheme=None, act='none'),
    'int8': dict(scheme='int8', act='none'),
    'int8_dynamic': dict(scheme='int8', act='dynamic'),
    'int4_g128': dict(scheme='int4', act='none'),
    'f32_dynamic': dict(scheme=None, act='dynamic'),
}


def quant(variant: str = 't5_small', batch: int = 1, source_len: int = 32, new_tokens: int = 32,
          repeats: int = 3, settings=tuple(SETTINGS)) -> dict:
  import jax
  from t5like.compress import quantize
  from t5like.config import get_variant
  from t5like.infer import decode
  from t5like.models import transformer
  cfg = get_variant(variant, dropout_rate=0.0)
  params = transformer.init_params(cfg, jax.random.key(0))
  f32_bytes = quantize.weight_bytes(params)
  enc = jax.random.randint(jax.random.key(1), (batch, source_len), 2, cfg.vocab_size)
  out = {'variant': variant, 'batch': batch, 'source_len': source_len, 'new_tokens': new_tokens,
         'repeats': repeats, 'backend': jax.default_backend(), 'devices': jax.device_count(),
         'cpu_count': os.cpu_count(), 'machine': platform.machine(), 'settings': {}}
  for name in settings:
    s = SETTINGS[name]
    if s['scheme'] is None:
      p, c = params, cfg.with_quant(activations=s['act'])
    else:
      p, c = quantize.quantize_params(params, cfg, s['scheme'], group_size=128,
                                      activation_quant=s['act'])
    t0 = time.perf_counter()
    jax.block_until_ready(decode.greedy(p, c, enc, new_tokens, stop_at_eos=False))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(decode.greedy(p, c, enc, new_tokens, stop_at_eos=False))
      times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    out['settings'][name] = {'seconds': sec, 'tokens_per_s': batch * new_tokens / sec,
                             'first_call_s': compile_s, 'weight_bytes': quantize.weight_bytes(p),
                             'bytes_vs_f32': quantize.weight_bytes(p) / f32_bytes}
    print(f'{name}: {batch * new_tokens / sec:.1f} tokens/s', file=sys.stderr, flush=True)
  base = out['settings'].get('f32')
  if base:
    for r in out['settings'].values():
      r['speed_vs_f32'] = r['tokens_per_s'] / base['tokens_per_s']
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--variant', default='t5_small')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--source_len', type=int, default=32)
  ap.add_argument('--new_tokens', type=int, default=32)
  ap.add_argument('--repeats', type=int, default=3)
  ap.add_argument('--settings', default=','.join(SETTINGS))
  ap.add_argument('--out', default='', help='also write the JSON here')
  a = ap.parse_args(argv)
  res = quant(a.variant, a.batch, a.source_len, a.new_tokens, a.repeats, a.settings.split(','))
  text = json.dumps(res, indent=1)
  print(text)
  if a.out:
    with open(a.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
