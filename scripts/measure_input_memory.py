#!/usr/bin/env python
"""Memory used by the input pipeline: the main job's corpus and a generated one `--scale` times
larger, each through the in-memory text pipeline and through preprocessed ArrayRecord chunks.

  python scripts/measure_input_memory.py [--scale=10] [--batches=50] \
      [--out=experiments/results/input_memory.json]

Each case runs in a fresh process: its resident memory after importing jax and t5like (the
baseline), after `make_datasets` (tokenizer, chunks, iterators), and its peak after `--batches`
training batches and one pass over the validation batches; the pipeline's share is peak minus
baseline. The config is the main job's (experiments/configs/shakespeare.py); the larger corpus is
the same plays `--scale` times over, each copy's lines in another order, written as a folder of
.txt files. Preprocessing (scripts/preprocess_corpus.py) runs in its own process and reports its
own peak. Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'experiments', 'configs', 'shakespeare.py')


def _rss_mib() -> float:
  import psutil
  return psutil.Process().memory_info().rss / 2**20


def child(corpus: str, workdir: str, batches: int) -> dict:
  """One case, in this process: what the pipeline adds to a process that has jax and t5like."""
  import jax
  import jax.numpy as jnp
  import ml_collections  # noqa: F401
  from t5like import config as config_lib
  from t5like.data import pipeline
  from t5like.train import loop  # noqa: F401  (what a training process has imported)
  jnp.ones(4).block_until_ready()
  import importlib.util
  spec = importlib.util.spec_from_file_location('experiment_config', CONFIG)
  exp_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp_config)
  cfg = config_lib.from_dict(config_lib.TrainConfig, exp_config.get_config('default').to_dict())
  data = cfg.data.__class__(**{**cfg.data.__dict__, 'corpus': corpus})
  base = _rss_mib()
  t0 = time.perf_counter()
  train, eval_batches, tok = pipeline.make_datasets(data, cfg.model.arch, workdir, seed=cfg.seed)
  built = _rss_mib()
  t1 = time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += int((next(train)['decoder_segment_ids'] > 0).sum())
  t2 = time.perf_counter()
  trained = _rss_mib()
  n_eval = sum(1 for _ in eval_batches())   # builds and caches the validation rows
  t3 = time.perf_counter()
  final = _rss_mib()
  peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, final)
  return {'corpus': corpus, 'num_train_chunks': train.get_state()['num_chunks'],
          'baseline_rss_mib': round(base, 1), 'after_make_datasets_rss_mib': round(built, 1),
          'final_rss_mib': round(final, 1), 'peak_rss_mib': round(peak, 1),
          'after_train_batches_rss_mib': round(trained, 1),
          'pipeline_mib': round(peak - base, 1), 'make_datasets_s': round(t1 - t0, 1),
          'batches': batches, 'train_batches_s': round(t2 - t1, 2),
          'eval_pass_s': round(t3 - t2, 2), 'eval_batches': n_eval,
          'decoder_tokens_in_batches': tokens, 'devices': jax.device_count()}


def _run(args: list[str]) -> dict:
  r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                     env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if r.returncode:
    raise SystemExit(f'{args[:2]} failed:\n{r.stderr[-3000:]}')
  return json.loads(r.stdout.strip().splitlines()[-1])


def write_scaled_corpus(folder: str, scale: int) -> dict:
  """The plays `scale` times, copy k with each play's lines rotated by a k-dependent offset."""
  from t5like.data import corpus
  docs = corpus.shakespeare_documents()
  size = 0
  for k in range(scale):
    os.makedirs(os.path.join(folder, f'copy{k:02d}'), exist_ok=True)
    for d in docs:
      lines = d.text.splitlines()
      shift = (k * 7919) % max(len(lines), 1)
      text = '\n'.join(lines[shift:] + lines[:shift]) + '\n'
      with open(os.path.join(folder, f'copy{k:02d}', f'{d.name}.txt'), 'w') as f:
        f.write(text)
      size += len(text.encode())
  return {'documents': scale * len(docs), 'bytes': size}


def main() -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--scale', type=int, default=10)
  p.add_argument('--batches', type=int, default=50)
  p.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results', 'input_memory.json'))
  p.add_argument('--child', nargs=2, metavar=('CORPUS', 'WORKDIR'), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(*args.child, args.batches)))
    return {}
  me = os.path.abspath(__file__)
  with tempfile.TemporaryDirectory(prefix='t5like_input_memory_') as tmp:
    big = os.path.join(tmp, f'shakespeare_x{args.scale}')
    generated = write_scaled_corpus(big, args.scale)
    report = {'command': 'python scripts/measure_input_memory.py ' + ' '.join(sys.argv[1:]),
              'config': 'experiments/configs/shakespeare.py (the main job)',
              'scale': args.scale, 'generated_corpus': generated, 'preprocess': {}, 'cases': {}}
    for name, corpus in (('x1', 'shakespeare'), (f'x{args.scale}', big)):
      out = os.path.join(tmp, f'records_{name}')
      report['preprocess'][name] = _run([os.path.join(ROOT, 'scripts', 'preprocess_corpus.py'),
                                         f'--config={CONFIG}', f'--config.data.corpus={corpus}',
                                         f'--out={out}'])
      for kind, source in (('text', corpus), ('records', out)):
        case = f'{kind}_{name}'
        report['cases'][case] = _run([me, '--child', source, os.path.join(tmp, f'w_{case}'),
                                      f'--batches={args.batches}'])
        print(case, json.dumps(report['cases'][case]), file=sys.stderr)
  report['preprocess'] = {k: {f: v[f] for f in ('num_train_chunks', 'seconds', 'peak_rss_mib',
                                                 'train_documents')}
                          for k, v in report['preprocess'].items()}
  for case in report['cases'].values():
    case['corpus'] = os.path.basename(case['corpus'])
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=1, sort_keys=True)
  print(json.dumps(report, indent=1, sort_keys=True))
  return report


if __name__ == '__main__':
  main()
