"""Measurements of the compression study (t5like/compress/study.py), the same for every variant.

- `quality`: the task's metrics (sacrebleu BLEU / chrF, exact match) on the held-out test split
  (`StudyConfig.test_examples` pairs evenly spaced over it, the same for every variant), with 95%
  bootstrap intervals and a paired bootstrap test against the teacher's predictions; the
  validation loss (token cross-entropy over the first `validation_batches` validation batches).
- `speed`: greedy decoding tokens/s at batch 1 and 8 (the decoder length in new tokens, no stop at
  EOS, so every call makes the same number of tokens), every variant compiled first, then timed
  in `timing_rounds` rounds that alternate the variants (the order rotated each round): load on a
  shared machine hits them all alike. Reported: the median per call. The new tokens are the task's
  decoder length, so batch 8 runs the very program the test scoring compiled. Peak memory is XLA's
  own account of the batch-1 decoding program (arguments + outputs + temporaries - aliased).
- `serve`: one server process over all the variants' bundles, the load test against each at 1
  and 16 clients.

A variant decodes through `t5like.infer.decode.greedy` with backend 'auto' (the server's path:
quantised models take the quantised layers, float ones the CPU kernels where present); the
dynamic-pruning variants run the XLA backend inside `dynamic.ffn_topk` (the interception acts at
trace time, so each gets its own compiled program, keyed by a config name of its own).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

from t5like.compress import dynamic
from t5like.compress.quantize import weight_bytes
from t5like.data.tasks import metrics as metrics_lib
from t5like.infer import decode
from t5like.models import abstract_params, build_model, param_count
from t5like.train import evaluation
from t5like.train import step as step_lib


def test_examples(task, n: int):
  """`n` test examples evenly spaced over the split (every play represented); 0: all."""
  ex = task.examples('test')
  if n and n < len(ex):
    idx = np.linspace(0, len(ex) - 1, n).round().astype(int)
    ex = [ex[i] for i in idx]
  return ex


@functools.partial(jax.jit, static_argnames=('cfg',))
def _eval_sums(params, batch, cfg):
  # Keyed by the config: variants of one architecture share the compiled program.
  return step_lib.eval_step(params, batch, model=build_model(cfg))


class Runner:
  """How one variant decodes and evaluates: its params, config, backend and context."""

  def __init__(self, name: str, params, cfg, ffn_topk: int = 0):
    self.name, self.ffn_topk = name, ffn_topk
    self.raw_params = jax.tree.map(jnp.asarray, params)
    # A config name of its own: the decode jit is keyed by it, so a dynamic variant never reuses
    # the dense program traced for its parent (and vice versa).
    self.cfg = cfg.replace(name=f'{cfg.name}__{name}') if ffn_topk else cfg
    self.backend = 'xla' if ffn_topk else 'auto'
    self.params = decode.prepare_params(self.cfg, self.raw_params, self.backend)

  def context(self):
    return dynamic.ffn_topk(self.ffn_topk) if self.ffn_topk else contextlib.nullcontext()

  def greedy(self, inputs_BS, new_tokens: int, stop_at_eos: bool = True):
    with self.context():
      return decode.greedy(self.params, self.cfg, inputs_BS, new_tokens, stop_at_eos=stop_at_eos,
                           backend=self.backend)

  def generate(self, tokenizer, inputs, S: int, T: int, batch_size: int) -> list[str]:
    rows = evaluation.encode_rows(tokenizer, inputs, S, 'compress study')
    out = []
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - n, S), np.int32)])
      # No stop at EOS: the same program the batch-8 timing runs (one compile); the text ends
      # at the first EOS either way.
      tokens = np.asarray(jax.device_get(
          self.greedy(jnp.asarray(chunk), T, stop_at_eos=False).tokens))[:n]
      for row in tokens.tolist():
        if tokenizer.eos_id in row:
          row = row[:row.index(tokenizer.eos_id)]
        out.append(tokenizer.decode(row))
    return out

  def validation_loss(self, batches, max_batches: int) -> float:
    """Token cross-entropy over the first `max_batches` (0: all) validation batches."""
    tot = np.zeros(2)
    with self.context():
      for i, b in enumerate(batches()):
        if max_batches and i >= max_batches:
          break
        out = jax.device_get(_eval_sums(self.raw_params, {k: jnp.asarray(v) for k, v in b.items()},
                                        self.cfg))
        tot += [float(out['loss_sum']), float(out['weight_sum'])]
    return float(tot[0] / max(tot[1], 1.0))

  def compile(self, inputs_BS, new_tokens: int):
    """The greedy decoding program for this input shape (no stop at EOS), compiled once: call it
    as `exe(self.params, inputs_BS)`; `exe.memory_analysis()` is XLA's account of its memory."""
    with self.context():
      return decode.greedy.lower(self.params, self.cfg, inputs_BS, new_tokens,
                                 stop_at_eos=False, backend=self.backend).compile()


def peak_bytes(exe) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled program (None if unknown)."""
  m = exe.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def sizes(params, cfg) -> dict:
  """Parameter count (of the float model of the same shapes: quantised leaves pack two int4
  values a byte and add scales) and weight bytes (every stored leaf: embedding, output layer,
  scales)."""
  float_cfg = cfg.with_quant(weights='none', activations='none', qat='none')
  return {'params': param_count(abstract_params(float_cfg)),
          'stored_elements': param_count(params), 'weight_bytes': weight_bytes(params)}


def quality(runner: Runner, tokenizer, task, examples, lengths, batch_size: int,
            n_bootstrap: int, teacher_preds=None) -> tuple[dict, list[str]]:
  """Test metrics with 95% CIs (and the paired difference from the teacher); predictions."""
  S, T = lengths['encoder'], lengths['decoder']
  preds = runner.generate(tokenizer, [e.input for e in examples], S, T, batch_size)
  preds = [task.postprocess_text(p) for p in preds]
  refs = [task.postprocess_text(e.target) for e in examples]
  out = {'test_examples': len(examples),
         'test': metrics_lib.with_confidence(task.metrics, preds, refs, n_bootstrap)}
  if teacher_preds is not None:
    out['vs_teacher'] = metrics_lib.paired_significance(task.metrics, preds, teacher_preds, refs,
                                                        n_bootstrap)
  return out, preds


def speed(runners: list[Runner], inputs_BS: np.ndarray, new_tokens: int, rounds: int,
          print_fn=print) -> dict[str, dict]:
  """{name: {'tokens_per_s_b1', 'tokens_per_s_b8', 'peak_bytes_b1', ...}}, timed alternately."""
  x1, x8 = jnp.asarray(inputs_BS[:1]), jnp.asarray(inputs_BS[:8])
  out = {r.name: {} for r in runners}
  calls = {}
  for r in runners:   # compile everything first
    exe = r.compile(x1, new_tokens)
    out[r.name]['peak_bytes_b1'] = peak_bytes(exe)
    # batch 8: the program the test-set scoring compiled (same shapes and options)
    calls[(r.name, 1)] = functools.partial(exe, r.params, x1)
    calls[(r.name, 8)] = functools.partial(r.greedy, x8, new_tokens, stop_at_eos=False)
    for b in (1, 8):
      jax.block_until_ready(calls[(r.name, b)]())
  times = {k: [] for k in calls}
  for k in range(rounds):
    order = runners[k % len(runners):] + runners[:k % len(runners)]
    for r in order:
      for b in (1, 8):
        t0 = time.perf_counter()
        jax.block_until_ready(calls[(r.name, b)]())
        times[(r.name, b)].append(time.perf_counter() - t0)
    print_fn(f'  timing round {k + 1}/{rounds} done')
  for (name, b), ts in times.items():
    med = float(np.median(ts))
    out[name][f'tokens_per_s_b{b}'] = b * new_tokens / med
    out[name][f'decode_s_b{b}'] = ts
  return out


# ----------------------------------------------------------------------------- serving

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _ready(url: str) -> bool:
  try:
    with urllib.request.urlopen(f'{url}/health/ready', timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


def serve_and_load_test(bundles_dir: str, names: list[str], load_test_script: str, out_dir: str,
                        *, requests: int, max_tokens: int, prompt_len: int,
                        startup_timeout_s: float = 1800, on_result=None, test_names=None,
                        log_path: str = '', print_fn=print) -> dict[str, dict]:
  """One server over `bundles_dir` serving `names`; the load test (1 and 16 clients, greedy
  tokens/s reported; its sampled levels run too and count in `failed`) on each.
  {name: {'tokens_per_s_c1', 'tokens_per_s_c16', 'failed', 'ok', 'file'}} (or {'error'})."""
  os.makedirs(out_dir, exist_ok=True)
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  cmd = [sys.executable, '-m', 't5like.serve', f'--model_base_path={bundles_dir}',
         f'--model_names={",".join(names)}', f'--port={port}', '--num_slots=16',
         f'--max_queue={max(64, requests)}', '--prompt_buckets=32',
         f'--max_new_tokens={max_tokens}', '--log_level=warning']
  log_path = log_path or os.path.join(out_dir, 'server.log')
  results: dict[str, dict] = {}
  with open(log_path, 'w') as log_f:
    proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT)
    try:
      t0 = time.time()
      while not _ready(url):
        if proc.poll() is not None:
          raise RuntimeError(f'the server exited with status {proc.returncode}; see {log_path}')
        if time.time() - t0 > startup_timeout_s:
          raise RuntimeError(f'the server was not ready within {startup_timeout_s:.0f}s')
        time.sleep(1.0)
      print_fn(f'  server ready with {len(names)} models after {time.time() - t0:.0f}s')
      for name in (names if test_names is None else test_names):
        path = os.path.join(out_dir, f'{name}.json')
        run = subprocess.run([sys.executable, load_test_script, f'--url={url}', f'--model={name}',
                              '--concurrency=1,16', f'--num_requests={requests}',
                              f'--max_tokens={max_tokens}', f'--prompt_len={prompt_len}',
                              f'--probe_requests={requests}', f'--out={path}'],
                             capture_output=True, text=True)
        if run.returncode != 0 or not os.path.isfile(path):
          results[name] = {'error': (run.stderr or run.stdout)[-500:]}
          if on_result:
            on_result(name, results[name])
          continue
        with open(path) as f:
          rep = json.load(f)
        levels = rep['levels']
        greedy = levels['greedy'] if isinstance(levels, dict) else levels
        every = [lv for group in (levels.values() if isinstance(levels, dict) else [levels])
                 for lv in group]
        by_c = {lv['concurrency']: lv for lv in greedy}
        results[name] = {'tokens_per_s_c1': by_c[1]['output_tokens_per_s'],
                         'tokens_per_s_c16': by_c[16]['output_tokens_per_s'],
                         'failed': sum(lv['failed'] for lv in every),
                         'metrics_match': all(lv['metrics_check']['match'] for lv in every),
                         'file': os.path.basename(path)}
        if on_result:
          on_result(name, results[name])
        print_fn(f'  load test {name}: {results[name]["tokens_per_s_c1"]:.0f} / '
                 f'{results[name]["tokens_per_s_c16"]:.0f} tokens/s at 1 / 16 clients, '
                 f'{results[name]["failed"]} failed')
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        proc.kill()
  return results
