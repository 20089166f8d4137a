"""Pruning benchmark: forward and decode speed of surgically shrunk models against the dense one,
and of dynamic FFN top-k, all in one run on this machine (random f32 weights: speed depends on
shapes only; quality is in experiments/prune.py).

  python scripts/bench_prune.py [--runs=5] [--out=experiments/results/prune_bench.json]
  (to be wired as `python scripts/bench.py prune`: `add_args(parser)`, `run(args) -> dict`)

Model: the experiments/prune.py Shakespeare model (d_model 128, 8 heads of 16, d_ff 512, 2 + 2
layers). For each sparsity, structured L2 masks (same count per layer, self-attention heads tied
across layers) and `surgery.shrink` give a model with fewer heads and a smaller d_ff. Timed:
the teacher-forced forward at batch 8 x (64 + 64) tokens, greedy decoding of 32 new tokens after a
64-token input at batch 1 (medians of --runs after a warm-up); ratios are dense / shrunk time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5like.compress import dynamic, prune, surgery
from t5like.config import get_variant
from t5like.infer import decode
from t5like.models import build_model, init_params, param_count


def add_args(parser):
  parser.add_argument('--sparsities', default='0.3,0.5,0.7,0.9')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--out', default='')


def bench_config():
  return get_variant('t5_small', d_model=128, num_heads=8, head_dim=16, d_ff=512,
                     num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                     vocab_size=2176).replace(name='t5_shakespeare_prune')


def _median_time(fn, runs):
  jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_model(params, cfg, args, ffn_topk: int = 0):
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, args.length)), jnp.int32)
  enc1 = tok[:1]
  model = build_model(cfg)
  ctx = (lambda: dynamic.ffn_topk(ffn_topk)) if ffn_topk else None

  @jax.jit
  def forward(p, x):
    if ctx is None:
      return model.apply({'params': p}, x, x)
    with ctx():
      return model.apply({'params': p}, x, x)

  @jax.jit
  def generate(p, x):
    run = lambda: decode.greedy.__wrapped__(p, cfg, x, args.new_tokens, False).tokens
    if ctx is None:
      return run()
    with ctx():
      return run()

  fwd = _median_time(lambda: forward(params, tok), args.runs)
  dec = _median_time(lambda: generate(params, enc1), args.runs)
  return {'forward_ms': round(1e3 * fwd, 3),
          'forward_tokens_per_s': round(args.batch * 2 * args.length / fwd, 1),
          'decode_new_tokens_per_s': round(args.new_tokens / dec, 1)}


def run(args) -> dict:
  cfg = bench_config()
  params = init_params(cfg, jax.random.key(0))
  dense = time_model(params, cfg, args)
  result = {'benchmark': 'prune', 'backend': jax.default_backend(),
            'cpu_count': os.cpu_count(), 'runs': args.runs,
            'forward_shape': [args.batch, args.length, args.length],
            'decode': {'batch': 1, 'input_len': args.length, 'new_tokens': args.new_tokens},
            'dense': dict(dense, params=param_count(params), num_heads=cfg.num_heads,
                          d_ff=cfg.d_ff), 'shrunk': [], 'dynamic_ffn_topk': []}
  for s in [float(x) for x in args.sparsities.split(',')]:
    masks = prune.compute_masks(params, prune.PruneConfig(method='structured', sparsity=s,
                                                          norm='l2'))
    small, small_cfg, report = surgery.shrink(params, masks, cfg)
    t = time_model(small, small_cfg, args)
    result['shrunk'].append(dict(
        t, sparsity=round(prune.sparsity(masks, prune.prunable(params))['total'], 4),
        num_heads=small_cfg.num_heads, d_ff=small_cfg.d_ff, params=report['params'][1],
        forward_speedup=round(dense['forward_ms'] / t['forward_ms'], 2),
        decode_speedup=round(t['decode_new_tokens_per_s'] / dense['decode_new_tokens_per_s'], 2)))
    print(json.dumps(result['shrunk'][-1]), flush=True)
  for k in (cfg.d_ff // 2, cfg.d_ff // 4, cfg.d_ff // 8):
    t = time_model(params, cfg, args, ffn_topk=k)
    result['dynamic_ffn_topk'].append(dict(
        t, k=k, forward_speedup=round(dense['forward_ms'] / t['forward_ms'], 2),
        decode_speedup=round(t['decode_new_tokens_per_s'] / dense['decode_new_tokens_per_s'], 2)))
    print(json.dumps(result['dynamic_ffn_topk'][-1]), flush=True)
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_args(ap)
  args = ap.parse_args()
  result = run(args)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
