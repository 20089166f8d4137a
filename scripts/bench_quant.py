"""Quantised decoding speed: t5like's f32, int8 and int4 decoding against torch's dynamic int8 T5.

  python scripts/bench.py quant [--runs=5 --batches=1,8 --out=experiments/results/quant_decode.json]

Greedy t5_small (random weights), 128 input tokens, exactly 64 new, at batch 1 and 8. Each t5like
setting is quantised from the same float params (`compress.quantize.quantize_params`: int8 per
output channel, int4 in groups of `--group_size` along the contraction; weight-only) and put in
the decode backend's layout once (`decode.prepare_params`, as the server does at load: on CPU the
kernels of t5like/kernels, int8 / int4 panels dequantised in registers). 'torch_int8' is
transformers' PyTorch T5 on the same config after `torch.ao.quantization.quantize_dynamic`
(nn.Linear to dynamic int8), on `--torch_threads` threads (1 by default: on a shared, loaded 2-core
host its 2-thread OpenMP loops stall at every barrier, 2-5 tokens/s against about 43 on one
thread in a check at load ~10). The settings' calls alternate in one run (median of `runs`), so the
ratios come from one state of the host; `uptime` is the host's load before and after.
Weight bytes are those read per generated token (decoder, output layer; scales included).
"""
from __future__ import annotations

import os
import subprocess
import time

import jax

import bench_decode
from t5like.compress import quantize
from t5like.config import get_variant
from t5like.infer import backend as backend_lib, decode
from t5like.models import init_params

JAX_SETTINGS = ('f32', 'int8', 'int4')


def add_args(parser):
  parser.add_argument('--variant', default='t5_small')
  parser.add_argument('--input_len', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--group_size', type=int, default=128, help='int4 group size')
  parser.add_argument('--no_torch', action='store_true', help='skip the PyTorch comparison')
  parser.add_argument('--torch_threads', type=int, default=1, help='torch.set_num_threads')
  parser.add_argument('--out', default='', help='also write the JSON record to this file')


def _uptime() -> str:
  try:
    return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  except OSError:
    return 'load average: ' + ', '.join(f'{x:.2f}' for x in os.getloadavg())


def _torch_int8(model):
  import torch  # optional (parity extra): only for the PyTorch comparison
  return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _step_weight_bytes(params) -> int:
  """Bytes a decoding step reads: the decoder (but cross-attention keys / values, applied once to
  the encoder output) and the output layer (the tied table, or lm_head in the decoder)."""
  flat = jax.tree_util.tree_flatten_with_path(params['decoder'])[0]
  once = lambda path: 'cross_attention' in path and ("'key'" in path or "'value'" in path)
  dec = sum(x.nbytes for p, x in flat if not once(jax.tree_util.keystr(p)))
  out = 0 if 'lm_head' in params['decoder'] else quantize.weight_bytes(params['shared_embedding'])
  return dec + out


def run(args) -> dict:
  cfg = get_variant(args.variant)
  params = init_params(cfg, jax.random.key(0))
  models = {'f32': (params, cfg)}
  models['int8'] = quantize.quantize_params(params, cfg, 'int8')
  models['int4'] = quantize.quantize_params(params, cfg, 'int4', group_size=args.group_size)
  result = {'benchmark': 'quant', 'variant': args.variant, 'input_len': args.input_len,
            'new_tokens': args.new_tokens, 'runs': args.runs, 'int4_group_size': args.group_size,
            'backend': jax.default_backend(), 'uptime_before': _uptime(),
            'decode_backend': {}, 'prepare_s': {}, 'weight_bytes_per_token': {},
            'compile_s': {}}
  prepared = {}
  for name, (p, c) in models.items():
    result['decode_backend'][name] = backend_lib.get_backend('auto', c).name
    result['weight_bytes_per_token'][name] = _step_weight_bytes(p)
    t = time.perf_counter()
    prepared[name] = jax.block_until_ready(decode.prepare_params(c, p))
    result['prepare_s'][name] = round(time.perf_counter() - t, 3)
  for b in [int(x) for x in args.batches.split(',')]:
    runners = {}
    for name, (_, c) in models.items():
      runners[name], compile_s = bench_decode.jax_runner(prepared[name], c, b, args.input_len,
                                                         args.new_tokens)
      result['compile_s'][f'{name}_b{b}'] = round(compile_s, 2)
    if not args.no_torch:
      import torch  # optional (parity extra): only for the PyTorch comparison
      torch.set_num_threads(args.torch_threads)
      result['torch_threads'] = torch.get_num_threads()
      runners['torch_int8'] = bench_decode.torch_runner(cfg, b, args.input_len, args.new_tokens,
                                                        transform=_torch_int8)
    rates = bench_decode.median_rates(runners, b * args.new_tokens, args.runs)
    row = {name: round(r, 2) for name, r in rates.items()}
    row['int8_vs_f32'] = round(rates['int8'] / rates['f32'], 2)
    row['int4_vs_f32'] = round(rates['int4'] / rates['f32'], 2)
    row['int4_vs_int8'] = round(rates['int4'] / rates['int8'], 2)
    if 'torch_int8' in rates:
      row['int8_vs_torch_int8'] = round(rates['int8'] / rates['torch_int8'], 2)
      row['int4_vs_torch_int8'] = round(rates['int4'] / rates['torch_int8'], 2)
    result[f'b{b}_new_tokens_per_s'] = row
  result['uptime_after'] = _uptime()
  return result


def main(argv=None):
  import argparse
  import json
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_args(parser)
  args = parser.parse_args(argv)
  record = run(args)
  print(json.dumps(record))
  if args.out:
    with open(args.out, 'w') as f:
      f.write(json.dumps(record, indent=1, sort_keys=True) + '\n')


if __name__ == '__main__':
  main()
