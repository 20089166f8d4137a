"""The trainer: `train(config, workdir)` runs (or resumes) one experiment end to end.

1. data (`t5like.data.pipeline.make_datasets`: tokenizer trained or reused in the workdir); the
   model's vocabulary follows the tokenizer (`config.vocab_from_tokenizer`); the resolved config
   is written to `<workdir>/config.json`;
2. the mesh, the optimizer, the sharded train state: restored from the latest checkpoint in
   `<workdir>/checkpoints/` (with the data-iterator position) or freshly initialised;
3. steps: `train_step` (jitted, sharded, donated) under the mesh, its logical-axis rules and, for
   a mesh with stages, its pipeline schedule; every `log_every` steps a JSONL / TensorBoard record
   and a progress line with ETA, tokens/s and MFU (against the f32 matmul peak measured at start);
   a NaN/inf loss stops the run naming the step; validation every `eval_every` steps (and
   reduce-on-plateau fed with it); async checkpoints every `checkpoint_every` steps and at each
   evaluation (those carry the validation loss the best checkpoint is chosen by);
4. SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the run returns with
   `interrupted` set (rerun the same command to resume);
5. at the end: a final evaluation and checkpoint, `<workdir>/curves.png`, and sampled
   continuations of held-out text.

The workdir may be a cloud URI (`gs://bucket/run`): every file goes through etils.epath
(t5like.paths) and orbax. In a multi-process job every process runs the same steps and takes part
in checkpoints, evaluation and sampling (they are collectives), but only process 0 writes
config.json, metrics.jsonl, TensorBoard events, curves.png and summary.json (and trains the
tokenizer; t5like.data.tokenizer). MFU is reported against the measured matmul peak and, on a
chip in t5like.parallel.hardware's table, against its published peak (`mfu_published`).

Techniques that train (distillation) run through the same loop with a `Technique`: their own
`t5like.train.step.Loss` and an extra step input (the teacher's params), so they inherit all of
the above, gradient accumulation, label smoothing and z-loss included. Validation is the model's
own cross-entropy either way.

Returns a summary dict (steps, validation losses, paths, throughput).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from t5like import config as config_lib
from t5like import paths
from t5like import precision as precision_lib
from t5like.config import ConfigError, TrainConfig
from t5like.data import pipeline
from t5like.models import build_model, flops, param_count
from t5like.optim import make_optimizer, make_schedule, observe_validation
from t5like.parallel import hardware, partition
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.train import checkpoint as ckpt_lib
from t5like.train import finetune
from t5like.train import metrics as metrics_lib
from t5like.train import samples as samples_lib
from t5like.train import state as state_lib
from t5like.train import step as step_lib

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = ckpt_lib.CHECKPOINT_DIR
SUMMARY_FILE = 'summary.json'


@dataclasses.dataclass(frozen=True)
class Technique:
  """A technique that trains through `train` with its own loss (distillation, ...).

  name: the key its `settings` are saved under in config.json and in each checkpoint's config.
  make_loss(config) -> step.Loss: called with the resolved TrainConfig (label smoothing, z-loss).
  extra: the step's extra input (a pytree of arrays, e.g. the teacher's params), passed to every
    step and placed on the mesh by `extra_shardings(mesh, rules)` (default: replicated).
  check(config): raises ConfigError for a resolved config the technique cannot train.
  """
  name: str
  make_loss: Callable[[TrainConfig], step_lib.Loss]
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra: Any = None
  extra_shardings: Callable[[Mesh, Any], Any] | None = None
  check: Callable[[TrainConfig], None] | None = None


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the phases of one run share (built once by `train`)."""
  config: TrainConfig
  config_dict: dict
  workdir: str
  mesh: Mesh
  rules: tuple
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable
  loss: step_lib.Loss
  extra: tuple                # () or (the extra input, placed on the mesh,)
  extra_shardings: Any
  ckpt: ckpt_lib.Checkpointer
  train_iter: Any
  eval_batches: Callable
  tokenizer: Any
  print_fn: Callable[[str], None]
  timings: dict               # filled as the run goes (seconds per phase)
  pretrained: Any = None      # init_from's weights (finetune.load_init), applied on a fresh start
  task_eval: Any = None       # finetune.TaskEvaluator: task metrics at each evaluation


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
  """`obj` as JSON at `path` (local or a cloud URI), never half-written."""
  paths.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def _in_workdir(workdir: str, name: str) -> str:
  return paths.as_str(paths.resolve(workdir) / name)


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


# Step metrics that are states (the last value is reported), not per-step measurements (averaged
# over the logging interval); 'tokens' is summed.
_STATE_METRICS = ('learning_rate', 'loss_scale', 'skipped', 'skipped_steps', 'lr_grad_scale',
                  'lr_plateau_scale')


def _mean_metrics(pending: Sequence[tuple[int, dict]]) -> dict:
  """Interval average of per-step metrics (losses, accuracy, grad norm); the last value of states."""
  host = [(s, jax.device_get(m)) for s, m in pending]
  for s, m in host:
    metrics_lib.check_finite(s, m)
  out = {k: float(np.asarray(v)) for k, v in host[-1][1].items()}
  for k in out:
    if k not in _STATE_METRICS:
      out[k] = float(np.mean([np.asarray(m[k]) for _, m in host]))
  out['tokens'] = float(sum(np.asarray(m['tokens']) for _, m in host))
  return out


def train(config: TrainConfig, workdir: str, *, technique: Technique | None = None,
          devices: Sequence[jax.Device] | None = None,
          print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (or resumes) `config` in `workdir`, with `technique`'s loss if given; see the module
  docstring."""
  workdir = paths.as_str(paths.resolve(workdir))   # local: absolute; gs://...: unchanged
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  writes = jax.process_index() == 0   # one writer per job
  t_start = time.perf_counter()
  mesh = make_mesh(config.mesh, devices)
  rules = get_rules(config.mesh.rules)

  # A task run (config.task) and init_from change the data, the tokenizer and the first params.
  pretrained, config = finetune.load_init(config)
  train_iter, eval_batches, tokenizer, _ = finetune.make_data(config, workdir, pretrained)
  timings = {'data_s': time.perf_counter() - t_start}
  config = resolve_config(config, tokenizer)
  config_dict = config_lib.to_dict(config)
  if technique is not None:
    if technique.check is not None:
      technique.check(config)
    config_dict[technique.name] = dict(technique.settings)
    loss = technique.make_loss(config)
  else:
    loss = step_lib.cross_entropy_loss(config.label_smoothing, config.z_loss)
  if writes:
    write_json_atomic(_in_workdir(workdir, CONFIG_FILE), config_dict)

  extra, extra_sh = (), None
  if technique is not None and technique.extra is not None:
    extra_sh = (technique.extra_shardings(mesh, rules) if technique.extra_shardings
                else jax.tree.map(lambda _: partition.replicated(mesh), technique.extra))
    extra = (jax.device_put(technique.extra, extra_sh),)

  tx = make_optimizer(config.optim, None, config.num_steps)
  task_eval = finetune.TaskEvaluator(config, tokenizer, workdir) if config.task.name else None
  ckpt = ckpt_lib.Checkpointer(_in_workdir(workdir, CHECKPOINT_DIR),
                               keep=config.keep_checkpoints,
                               keep_best=config.keep_best_checkpoints,
                               async_save=config.async_checkpointing,
                               **finetune.best_checkpoint_options(config))
  run = _Run(config=config, config_dict=config_dict, workdir=workdir, mesh=mesh, rules=rules,
             model=build_model(config.model), tx=tx,
             schedule=make_schedule(config.optim, config.num_steps), loss=loss, extra=extra,
             extra_shardings=extra_sh, ckpt=ckpt, train_iter=train_iter,
             eval_batches=eval_batches, tokenizer=tokenizer, print_fn=print_fn, timings=timings,
             pretrained=pretrained, task_eval=task_eval)
  try:
    state, shardings, start = _restore_or_init(run)
    summary = {'workdir': workdir, 'start_step': start, 'interrupted': None}
    state = _steps(run, state, shardings, start, summary)
  finally:
    ckpt.close()
  _finish(run, state, summary)
  summary['timings'] = {k: round(v, 2) for k, v in timings.items()}
  summary['wall_s'] = time.perf_counter() - t_start
  if writes:
    write_json_atomic(_in_workdir(workdir, SUMMARY_FILE),
                      {k: v for k, v in summary.items() if k != 'samples'} |
                      {'samples': [list(s) for s in summary.get('samples', [])]})
  return summary


def _restore_or_init(run: _Run):
  """(train state, its shardings, start step): the latest checkpoint's, or a fresh one."""
  t0 = time.perf_counter()
  config, ckpt = run.config, run.ckpt
  start = ckpt.latest_step()
  if start is None:
    state, shardings = state_lib.create_train_state(config.model, run.tx, run.mesh, run.rules,
                                                    config.seed)
    state = finetune.init_params(state, shardings, run.pretrained, config)
    if run.pretrained is not None:
      run.print_fn(f'parameters from {run.pretrained.source} (optimizer state fresh)')
    start = 0
  else:
    abstract, shardings = state_lib.abstract_train_state(config.model, run.tx, run.mesh, run.rules)
    ckpt.check_compatible(start, run.config_dict)
    state, data_state, _ = ckpt.restore(start, abstract)
    try:
      run.train_iter.set_state(data_state)
    except pipeline.PipelineError as e:
      raise ckpt_lib.CheckpointError(f'checkpoint {ckpt.path(start)}: {e}') from e
    run.print_fn(f'resumed from {ckpt.path(start)} (step {start})')
  run.timings['state_s'] = time.perf_counter() - t0
  return state, shardings, start


def _steps(run: _Run, state, shardings, start: int, summary: dict):
  """The training steps from `start`, with logging, evaluation, checkpoints and the stop signal;
  fills `summary` and returns the final state."""
  config, mesh, ckpt, print_fn = run.config, run.mesh, run.ckpt, run.print_fn
  lengths = pipeline.sequence_lengths(config.data, config.model.arch)
  S, T = lengths.get('encoder', 0), lengths['decoder']
  B = config.data.batch_size
  n_params = param_count(state.params)
  tokens_per_step = B * flops.tokens_per_row(config.model, S, T)
  flops_per_step = flops.train_step_flops(config.model, B, S, T)
  peak = metrics_lib.measure_peak_flops()
  # The chip's published peak at the compute dtype, for all the mesh's devices (None: not a chip
  # in the table, e.g. a CPU).
  compute_dtype = precision_lib.get_policy(config.model.precision).compute_dtype.dtype.name
  chip = hardware.lookup(mesh.devices.flat[0].device_kind)
  published = chip.peak_flops(compute_dtype) * mesh.devices.size if chip else None
  print_fn(f'model {config.model.name} ({config.model.arch}): {n_params:,} parameters, '
           f'{flops_per_step / tokens_per_step:.3g} training FLOPs/token, '
           f'{flops_per_step:.3g} FLOPs/step; batch {B} x {lengths_str(S, T)}; '
           f'measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s'
           + (f'; published peak {mesh.devices.size} x {chip.name} at {compute_dtype} '
              f'{published / 1e12:.0f} TFLOP/s' if chip else ''))
  summary.update(parameters=n_params, peak_flops_per_s=peak, flops_per_step=flops_per_step,
                 published_peak_flops_per_s=published)

  writer = metrics_lib.MetricsWriter(run.workdir, resume_step=start if start else None)
  batch = next(run.train_iter)
  batch_sh = step_lib.batch_shardings(mesh, batch)
  train_fn = step_lib.jit_train_step(model=run.model, tx=run.tx, state_shardings=shardings,
                                     batch_shardings=batch_sh, mesh=mesh, loss=run.loss,
                                     extra_shardings=run.extra_shardings, schedule=run.schedule,
                                     grad_accum_steps=config.grad_accum_steps)
  eval_fn = step_lib.jit_eval_step(model=run.model, params_shardings=shardings.params,
                                   batch_shardings=batch_sh, mesh=mesh)
  run.timings['eval_s'] = 0.0

  def run_eval(params):
    t = time.perf_counter()
    out = evaluate(eval_fn, params, run.eval_batches, mesh, config.eval_batches)
    if run.task_eval is not None:   # decode the task's evaluation examples, task metrics
      out.update(run.task_eval(params))
      print_fn('task ' + ', '.join(f'{k[5:]} {v:.2f}' for k, v in out.items()
                                   if k.startswith('task/')))
    run.timings['eval_s'] += time.perf_counter() - t
    return out

  num_steps = config.num_steps
  with step_lib.mesh_context(mesh, run.rules, config.mesh), _StopOnSignal() as stop:
    if start == 0:
      val = run_eval(state.params)
      writer.write(0, val, 'eval')
      print_fn(f'step 0: validation loss {val["loss"]:.4f} (ln V = '
               f'{np.log(config.model.vocab_size):.3f})')
    pending: list[tuple[int, dict]] = []
    progress = metrics_lib.ProgressLine(num_steps, start)
    clock, clock_step = None, start
    last_train: dict = {}
    step = start
    clock_first = time.perf_counter()
    while step < num_steps:
      state, m = train_fn(state, pipeline.to_global_batch(batch, mesh), *run.extra)
      step += 1
      pending.append((step, m))
      if clock is None:  # exclude compilation from throughput
        jax.block_until_ready(m)
        run.timings['first_step_s'] = time.perf_counter() - clock_first
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
          if published:
            last_train['mfu_published'] = flops_per_step / steps_s / published
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
          ckpt.save(step, state, run.train_iter.get_state(), run.config_dict, val_loss=val_loss,
                    metrics={k: v for k, v in val.items() if k.startswith('task/')}
                    if val_loss is not None else None)
        clock, clock_step = time.perf_counter(), step
      if stopping:
        ckpt.wait()
        summary['interrupted'] = stop.received
        print_fn(f'{stop.received}: stopped at step {step}; checkpoint {ckpt.path(step)} saved. '
                 'Run the same command again to resume.')
        break
      if not last:
        batch = next(run.train_iter)
    ckpt.wait()
  writer.close()

  summary.update(final_step=step, final_train_loss=last_train.get('loss'),
                 tokens_per_s=last_train.get('tokens_per_s'), mfu=last_train.get('mfu'),
                 mfu_published=last_train.get('mfu_published'))
  # Only the writing process has the file (another may not see the workdir's disk).
  evals = ([r for r in metrics_lib.read_jsonl(writer.path) if r.get('split') == 'eval']
           if writer.enabled else [])
  if evals:
    summary.update(initial_val_loss=evals[0]['loss'], final_val_loss=evals[-1]['loss'],
                   final_val_accuracy=evals[-1]['accuracy'],
                   evals=[(r['step'], r['loss']) for r in evals])
  summary.update(checkpoint_dir=ckpt.directory, latest_checkpoint=ckpt.latest_step(),
                 best_checkpoint=ckpt.best_step(), metrics_file=writer.path,
                 tensorboard_dir=writer.tensorboard_dir,
                 config_file=_in_workdir(run.workdir, CONFIG_FILE))
  return state


def _finish(run: _Run, state, summary: dict) -> None:
  """The curves plot and, for a run that was not interrupted, sampled continuations."""
  config = run.config
  summary['plot'] = (metrics_lib.plot_curves(summary['metrics_file'],
                                             _in_workdir(run.workdir, metrics_lib.PLOT_FILE))
                     if jax.process_index() == 0 else None)
  t0 = time.perf_counter()
  if summary['interrupted'] is None and config.num_samples:
    _, val_docs = pipeline.load_splits(config.data)
    prompts = samples_lib.held_out_prompts(val_docs, config.num_samples)
    with step_lib.mesh_context(run.mesh, run.rules, config.mesh):
      summary['samples'] = samples_lib.sample_continuations(
          state.params, config.model, config.data, run.tokenizer, prompts,
          max_new_tokens=config.sample_tokens, seed=config.seed,
          temperature=config.sample_temperature, top_k=config.sample_top_k)
  run.timings['samples_s'] = time.perf_counter() - t0


def lengths_str(S: int, T: int) -> str:
  return f'{S} + {T} tokens' if S else f'{T} tokens'


def trained_params(config: TrainConfig, workdir: str, *, technique: Technique | None = None,
                   print_fn: Callable[[str], None] = print):
  """(params as host arrays, the resolved ModelConfig) of `config` trained in `workdir`: trained
  (or resumed) first unless the workdir's latest checkpoint is already at `config.num_steps`."""
  ckpt_dir = _in_workdir(workdir, CHECKPOINT_DIR)
  done = False
  if paths.resolve(ckpt_dir).is_dir():
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, keep_best=0)
    done = ckpt.latest_step() == config.num_steps
    ckpt.close()
  if not done:
    train(config, workdir, technique=technique, print_fn=print_fn)
  params, saved, _ = ckpt_lib.restore_params(workdir, config.num_steps)
  return params, config_lib.from_dict(config_lib.ModelConfig, saved['model'], prefix='model')
