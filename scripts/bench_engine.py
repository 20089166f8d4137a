"""Serving engine benchmark without HTTP: output tokens/s of engine settings side by side.

  python scripts/bench.py engine [--configs='steps=1,overlap=0;steps=1;steps=8'] [--out=FILE]

Every setting in `--configs` (`;`-separated; `steps`: decode steps per device call, `overlap`: 0 or
1) gets its own engine over the same random `--variant` weights, all compiled first. Then
`--rounds` rounds each run every engine in turn at every `--concurrency` (clients as threads, each
submitting its next greedy request when the last one finishes; every level the same prompts), so
the settings compared ran minutes, not hours, apart on a host whose speed drifts. One JSON object:
per setting and concurrency the output tokens/s of each round and their median, each setting's
median 16-vs-1 ratio (when both levels ran), and each setting's median per-round speed over the
first setting's.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from t5like.config import get_variant
from t5like.infer.engine import Engine, Request, SamplingParams
from t5like.models.random_weights import random_params


def add_args(parser):
  parser.add_argument('--variant', default='t5_tiny')
  parser.add_argument('--configs', default='steps=1,overlap=0;steps=1;steps=8,overlap=0;steps=8')
  parser.add_argument('--concurrency', default='1,16')
  parser.add_argument('--requests_per_client', type=int, default=12)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--num_slots', type=int, default=32)
  parser.add_argument('--prompt_len', type=int, default=16)
  parser.add_argument('--max_tokens', type=int, default=64)
  parser.add_argument('--out', default='', help='also write the JSON record to this file')


def parse_config(text: str) -> dict:
  """'steps=8,overlap=0' -> Engine keyword arguments."""
  out = {}
  for item in filter(None, text.split(',')):
    key, _, value = item.partition('=')
    if key == 'steps':
      out['decode_steps'] = int(value)
    elif key == 'overlap':
      out['overlap'] = bool(int(value))
    else:
      raise ValueError(f'unknown engine setting {key!r} in {text!r}; use steps= and overlap=')
  return out


def run_level(engine: Engine, prompts, concurrency: int, max_tokens: int) -> float:
  """Output tokens/s of `concurrency` clients working through `prompts`."""
  todo = list(reversed(prompts))
  lock = threading.Lock()
  count = [0]
  errors = []

  def client():
    while True:
      with lock:
        if not todo:
          return
        prompt = todo.pop()
      done = threading.Event()

      def on_event(kind, value):
        if kind == 'tokens':
          with lock:
            count[0] += len(value)
        else:
          if str(value).startswith('error'):
            errors.append(value)
          done.set()
      engine.submit(Request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                            on_event))
      done.wait()

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(concurrency)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise RuntimeError(f'engine failed requests: {errors[:3]}')
  return count[0] / (time.perf_counter() - t0)


def run(args) -> dict:
  cfg = get_variant(args.variant)
  params = random_params(cfg, seed=0, embed_std=0.3, std=0.2)
  names = [c.strip() for c in args.configs.split(';') if c.strip()]
  levels = [int(c) for c in args.concurrency.split(',')]
  engines = {}
  for name in names:
    engines[name] = Engine(params, cfg, num_slots=args.num_slots,
                           prompt_buckets=(max(8, args.prompt_len),),
                           max_new_tokens=args.max_tokens, max_queue=4 * max(levels),
                           **parse_config(name))
    engines[name].start()
  rng = np.random.default_rng(0)
  load = [os.getloadavg()[0]]
  rates = {n: {c: [] for c in levels} for n in names}
  try:
    for _ in range(args.rounds):
      for c in levels:
        prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt_len)]
                   for _ in range(c * args.requests_per_client)]
        for name in names:
          rates[name][c].append(run_level(engines[name], prompts, c, args.max_tokens))
  finally:
    for e in engines.values():
      e.close()
  load.append(os.getloadavg()[0])
  med = lambda xs: float(np.median(xs))
  first = names[0]
  record = {'bench': 'engine', 'variant': args.variant, 'num_slots': args.num_slots,
            'prompt_len': args.prompt_len, 'max_tokens': args.max_tokens, 'rounds': args.rounds,
            'requests_per_client': args.requests_per_client, 'load_avg': load,
            'tokens_per_s': {n: {str(c): {'by_round': rates[n][c], 'median': med(rates[n][c])}
                                 for c in levels} for n in names},
            f'vs_{first}': {n: {str(c): med([a / b for a, b in zip(rates[n][c], rates[first][c])])
                                for c in levels} for n in names}}
  if 1 in levels and 16 in levels:
    record['ratio_16_vs_1'] = {n: med([a / b for a, b in zip(rates[n][16], rates[n][1])])
                               for n in names}
  return record
