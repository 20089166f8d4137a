"""The training loop: `train(config, workdir)` runs (or resumes) one experiment end to end.

1. data (`t5like.data.pipeline.make_datasets`: tokenizer trained or reused in the workdir); the
   model's vocabulary follows the tokenizer (`config.vocab_from_tokenizer`); the resolved config
   is written to `<workdir>/config.json`;
2. the mesh, the optimizer, the sharded train state: restored from the latest checkpoint in
   `<workdir>/checkpoints/` (with the data-iterator position) or freshly initialised;
3. steps: `train_step` (jitted, sharded, donated) under the mesh and its logical-axis rules;
   every `log_every` steps a JSONL / TensorBoard record and a progress line with ETA, tokens/s and
   MFU (against the f32 matmul peak measured at start); a NaN/inf loss stops the run naming the
   step; validation every `eval_every` steps; async checkpoints every `checkpoint_every` steps and
   at each evaluation (those carry the validation loss the best checkpoint is chosen by);
4. SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the run returns with
   `interrupted` set (rerun the same command to resume);
5. at the end: a final evaluation and checkpoint, `<workdir>/curves.png`, and sampled
   continuations of held-out text.

Returns a summary dict (steps, validation losses, paths, throughput).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from t5like import config as config_lib
from t5like.config import ConfigError, TrainConfig
from t5like.data import pipeline
from t5like.models import build_model, flops, param_count
from t5like.optim import make_optimizer, make_schedule, observe_validation
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.train import checkpoint as ckpt_lib
from t5like.train import metrics as metrics_lib
from t5like.train import samples as samples_lib
from t5like.train import state as state_lib
from t5like.train import step as step_lib

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


class _StopOnSignal:
  """Turns the first SIGTERM / SIGINT into a request to checkpoint and stop (main thread only);
  a second one interrupts at once."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals, self.received, self._previous = signals, None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}')
    self.received = signal.Signals(signum).name
    log.warning('%s received: finishing the current step, then checkpointing and stopping',
                self.received)

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False


def resolve_config(config: TrainConfig, tokenizer) -> TrainConfig:
  """The config with the model vocabulary fitted to the tokenizer (or checked against it)."""
  if config.vocab_from_tokenizer:
    return dataclasses.replace(
        config, model=config.model.replace(vocab_size=tokenizer.model_vocab_size))
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                      f'tokenizer\'s {tokenizer.vocab_size} ids; raise it or set '
                      'vocab_from_tokenizer=True')
  return config


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def evaluate(eval_fn: Callable, params, eval_batches: Callable, mesh, max_batches: int) -> dict:
  """Token-weighted validation loss and accuracy over (at most `max_batches`, 0: all) batches."""
  totals = None
  for i, batch in enumerate(eval_batches()):
    if max_batches and i >= max_batches:
      break
    out = eval_fn(params, pipeline.to_global_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
  if totals is None:
    raise pipeline.PipelineError('the validation split gave no batches')
  totals = jax.device_get(totals)
  w = max(float(totals['weight_sum']), 1.0)
  return {'loss': float(totals['loss_sum']) / w, 'accuracy': float(totals['correct_sum']) / w,
          'tokens': float(totals['weight_sum'])}


def _mean_metrics(pending: Sequence[tuple[int, dict]]) -> dict:
  """Interval average of per-step metrics (loss, accuracy, grad norm); the last value of the rest."""
  host = [(s, jax.device_get(m)) for s, m in pending]
  for s, m in host:
    metrics_lib.check_finite(s, m)
  out = {k: float(np.asarray(v)) for k, v in host[-1][1].items()}
  for k in ('loss', 'z_loss', 'accuracy', 'grad_norm'):
    if k in out:
      out[k] = float(np.mean([np.asarray(m[k]) for _, m in host]))
  out['tokens'] = float(sum(np.asarray(m['tokens']) for _, m in host))
  return out


def train(config: TrainConfig, workdir: str, *, devices: Sequence[jax.Device] | None = None,
          print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir`; see the module docstring."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  t_start = time.perf_counter()
  mesh = make_mesh(config.mesh, devices)
  rules = get_rules(config.mesh.rules)

  train_iter, eval_batches, tokenizer = pipeline.make_datasets(
      config.data, config.model.arch, workdir, seed=config.seed)
  data_s = time.perf_counter() - t_start
  config = resolve_config(config, tokenizer)
  config_dict = config_lib.to_dict(config)
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), config_dict)
  lengths = pipeline.sequence_lengths(config.data, config.model.arch)
  S, T = lengths.get('encoder', 0), lengths['decoder']
  B = config.data.batch_size

  model = build_model(config.model)
  schedule = make_schedule(config.optim, config.num_steps)
  tx = make_optimizer(config.optim, None, config.num_steps)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                               keep=config.keep_checkpoints,
                               keep_best=config.keep_best_checkpoints,
                               async_save=config.async_checkpointing)
  try:
    return _run(config, config_dict, workdir, mesh, rules, model, tx, schedule, ckpt, train_iter,
                eval_batches, tokenizer, (B, S, T), t_start, print_fn, {'data_s': data_s})
  finally:
    ckpt.close()


def _run(config, config_dict, workdir, mesh, rules, model, tx, schedule, ckpt, train_iter,
         eval_batches, tokenizer, shape, t_start, print_fn, timings):
  B, S, T = shape
  t0 = time.perf_counter()
  abstract, shardings = state_lib.abstract_train_state(config.model, tx, mesh, rules)
  start = ckpt.latest_step()
  if start is None:
    state, shardings = state_lib.create_train_state(config.model, tx, mesh, rules, config.seed)
    start = 0
  else:
    ckpt.check_compatible(start, config_dict)
    state, data_state, _ = ckpt.restore(start, abstract)
    try:
      train_iter.set_state(data_state)
    except pipeline.PipelineError as e:
      raise ckpt_lib.CheckpointError(f'checkpoint {ckpt.path(start)}: {e}') from e
    print_fn(f'resumed from {ckpt.path(start)} (step {start})')

  timings['state_s'] = time.perf_counter() - t0
  n_params = param_count(state.params)
  tokens_per_step = B * flops.tokens_per_row(config.model, S, T)
  flops_per_step = flops.train_step_flops(config.model, B, S, T)
  peak = metrics_lib.measure_peak_flops()
  print_fn(f'model {config.model.name} ({config.model.arch}): {n_params:,} parameters, '
           f'{flops_per_step / tokens_per_step:.3g} training FLOPs/token, '
           f'{flops_per_step:.3g} FLOPs/step; batch {B} x {lengths_str(S, T)}; '
           f'measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s')

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start if start else None)
  first = next(train_iter)
  batch_sh = step_lib.batch_shardings(mesh, first)
  train_fn = step_lib.jit_train_step(model=model, tx=tx, state_shardings=shardings,
                                     batch_shardings=batch_sh, mesh=mesh, schedule=schedule,
                                     label_smoothing=config.label_smoothing, z_loss=config.z_loss,
                                     grad_accum_steps=config.grad_accum_steps)
  eval_fn = step_lib.jit_eval_step(model=model, params_shardings=shardings.params,
                                   batch_shardings=batch_sh, mesh=mesh)
  timings['eval_s'] = 0.0

  def run_eval(params):
    t = time.perf_counter()
    out = evaluate(eval_fn, params, eval_batches, mesh, config.eval_batches)
    timings['eval_s'] += time.perf_counter() - t
    return out
  summary: dict[str, Any] = {'workdir': workdir, 'start_step': start, 'interrupted': None,
                             'parameters': n_params, 'peak_flops_per_s': peak,
                             'flops_per_step': flops_per_step}
  num_steps = config.num_steps
  with step_lib.mesh_context(mesh, rules, config.mesh), _StopOnSignal() as stop:
    if start == 0:
      val = run_eval(state.params)
      writer.write(0, val, 'eval')
      print_fn(f'step 0: validation loss {val["loss"]:.4f} (ln V = {np.log(config.model.vocab_size):.3f})')
    pending: list[tuple[int, dict]] = []
    progress = metrics_lib.ProgressLine(num_steps, start)
    clock, clock_step = None, start
    last_train: dict = {}
    val_loss = None
    batch = first
    step = start
    clock_first = time.perf_counter()
    while step < num_steps:
      state, m = train_fn(state, pipeline.to_global_batch(batch, mesh))
      step += 1
      pending.append((step, m))
      if clock is None:  # exclude compilation from throughput
        jax.block_until_ready(m)
        timings['first_step_s'] = time.perf_counter() - clock_first
        clock, clock_step = time.perf_counter(), step
      last = step == num_steps
      stopping = stop.received is not None
      is_eval = step % config.eval_every == 0 or last
      is_ckpt = step % config.checkpoint_every == 0 or is_eval or stopping
      if step % config.log_every == 0 or is_eval or is_ckpt:
        last_train = _mean_metrics(pending)
        pending = []
        now = time.perf_counter()
        if step > clock_step:
          steps_s = (now - clock) / (step - clock_step)
          last_train.update(step_s=steps_s, tokens_per_s=tokens_per_step / steps_s,
                            mfu=flops_per_step / steps_s / peak)
        writer.write(step, last_train)
        print_fn(progress.line(step, last_train))
        val_loss = None
        if is_eval:
          val = run_eval(state.params)
          val_loss = val['loss']
          writer.write(step, val, 'eval')
          print_fn(f'step {step}: validation loss {val_loss:.4f}, accuracy {val["accuracy"]:.3f}')
          if config.optim.plateau:  # reduce-on-plateau reads the validation loss (saved below)
            state = state.replace(opt_state=jax.device_put(
                observe_validation(state.opt_state, val_loss), shardings.opt_state))
        if is_ckpt:
          ckpt.save(step, state, train_iter.get_state(), config_dict, val_loss=val_loss)
        clock, clock_step = time.perf_counter(), step
      if stopping:
        ckpt.wait()
        summary['interrupted'] = stop.received
        print_fn(f'{stop.received}: stopped at step {step}; checkpoint {ckpt.path(step)} saved. '
                 'Run the same command again to resume.')
        break
      if not last:
        batch = next(train_iter)
    ckpt.wait()
  writer.close()

  summary.update(final_step=step, final_train_loss=last_train.get('loss'),
                 tokens_per_s=last_train.get('tokens_per_s'), mfu=last_train.get('mfu'))
  evals = [r for r in metrics_lib.read_jsonl(writer.path) if r.get('split') == 'eval']
  if evals:
    summary.update(initial_val_loss=evals[0]['loss'], final_val_loss=evals[-1]['loss'],
                   final_val_accuracy=evals[-1]['accuracy'])
  summary.update(checkpoint_dir=ckpt.directory, latest_checkpoint=ckpt.latest_step(),
                 best_checkpoint=ckpt.best_step(), metrics_file=writer.path,
                 tensorboard_dir=writer.tensorboard_dir,
                 config_file=os.path.join(workdir, CONFIG_FILE))
  summary['plot'] = metrics_lib.plot_curves(writer.path,
                                            os.path.join(workdir, metrics_lib.PLOT_FILE))
  t0 = time.perf_counter()
  if summary['interrupted'] is None and config.num_samples:
    _, val_docs = pipeline.load_splits(config.data)
    prompts = samples_lib.held_out_prompts(val_docs, config.num_samples)
    with step_lib.mesh_context(mesh, rules, config.mesh):
      summary['samples'] = samples_lib.sample_continuations(
          state.params, config.model, config.data, tokenizer, prompts,
          max_new_tokens=config.sample_tokens, seed=config.seed,
          temperature=config.sample_temperature, top_k=config.sample_top_k)
  timings['samples_s'] = time.perf_counter() - t0
  summary['timings'] = {k: round(v, 2) for k, v in timings.items()}
  summary['wall_s'] = time.perf_counter() - t_start
  write_json_atomic(os.path.join(workdir, 'summary.json'),
                    {k: v for k, v in summary.items() if k != 'samples'} |
                    {'samples': [list(s) for s in summary.get('samples', [])]})
  return summary


def lengths_str(S: int, T: int) -> str:
  return f'{S} + {T} tokens' if S else f'{T} tokens'
