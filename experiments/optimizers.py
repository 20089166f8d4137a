"""Compares optimizers, learning-rate schedules and precision policies on one small T5.

  python experiments/optimizers.py [--config=experiments/configs/optimizers.py[:smoke]]
                                   [--workdir=runs/optimizers] [--results=experiments/results]

Every run is `t5like.train.loop.train` on the same TrainConfig (t5_tiny, Shakespeare, span
corruption, the same steps, batches and evaluations); only the optimizer section (or
model.precision) changes. Phases:

1. sweep: each optimizer with the cosine schedule at each of its learning rates (config.sweep);
   the lowest final validation loss picks its rate (all sweep runs have the full length, so the
   best run is the optimizer's result);
2. schedules: `config.schedule_optimizer` at its best rate with every schedule. 'rsqrt' gets
   lr * sqrt(warmup_steps), so that its peak rate (at the end of its flat warm-up) equals the
   others'; 'grad_stats' is the base schedule with gradient-norm statistics scaling and spike
   skipping; 'plateau' is the base schedule with reduce-on-plateau on the validation loss;
3. precision: the same run in 'bf16' against 'f32', plus seconds per step of both measured in
   interleaved rounds of the trainer's jitted train step (the machine is shared, so alternating
   rounds see the same load).

Outputs: <results>/optimizers.json (every run: config, final validation loss, steps/s, skipped
steps, curves), <results>/optimizers.md (the tables) and <results>/optimizers.png (loss curves).
Finished runs are cached in <workdir>/results/<run>-<config hash>.json, so an interrupted
experiment resumes; the SentencePiece model is trained once into <workdir>/tokenizer and reused by
every run. `--part` splits the work between two processes on the same workdir (on a shared
machine, two processes get twice the CPU share): 'sweep' runs the sweep of every optimizer but
`config.schedule_optimizer`, 'main' that optimizer's sweep, the schedules and the precision runs;
'timing' only the interleaved bf16 / f32 timing; 'all' (the default) runs whatever is not cached
yet and writes the outputs.
"""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from t5like import config as config_lib
from t5like.data import pipeline, tokenizer as tok_lib
from t5like.models import build_model
from t5like.optim import make_optimizer, make_schedule
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.train import loop, metrics as metrics_lib, state as state_lib, step as step_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_HERE, 'configs', 'optimizers.py'), 'Experiment config file[:arg].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/optimizers', 'Cache of runs and the tokenizer.')
_RESULTS = flags.DEFINE_string('results', os.path.join(_HERE, 'results'), 'Output folder.')
_CACHED_ONLY = flags.DEFINE_bool('cached_only', False,
                                  'Assemble the outputs from finished runs only; list the rest.')
_REVERSE = flags.DEFINE_bool('reverse', False, "'sweep' part: take the optimizers in reverse "
                              'order (a second sweep process; runs are claimed, never duplicated).')
_PART = flags.DEFINE_enum('part', 'all', ['all', 'sweep', 'main', 'timing'],
                          "'sweep' / 'main': one of two cooperating processes (module docstring).")


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def config_key(cfg: config_lib.TrainConfig) -> str:
  blob = json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


class Runner:
  """Runs (or reuses from <workdir>/runs.json) one `loop.train` per TrainConfig."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.cache_dir = os.path.join(self.workdir, 'results')
    os.makedirs(self.cache_dir, exist_ok=True)

  def cached_path(self, name: str, cfg: config_lib.TrainConfig) -> str:
    return os.path.join(self.cache_dir, f'{name}-{config_key(cfg)}.json')

  def is_cached(self, name: str, cfg: config_lib.TrainConfig) -> bool:
    return os.path.exists(self.cached_path(name, cfg))

  def run(self, name: str, cfg: config_lib.TrainConfig, claim: bool = False, **labels):
    """The run's result; None when `claim` and another process has claimed the run."""
    cached = self.cached_path(name, cfg)
    if os.path.exists(cached):
      with open(cached) as f:
        result = json.load(f)
      log(f'{name}: cached (final validation loss {result["final_val_loss"]:.4f})')
      return result
    if claim:
      try:
        os.close(os.open(cached + '.claim', os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      except FileExistsError:
        log(f'{name}: claimed by another process, skipped')
        return None
    wd = os.path.join(self.workdir, 'runs', name)
    shutil.rmtree(wd, ignore_errors=True)       # a fresh run, never a resume of another config
    t = time.perf_counter()
    lines = []
    summary = loop.train(cfg, wd, print_fn=lines.append)
    wall = time.perf_counter() - t
    if summary.get('interrupted'):   # SIGTERM / SIGINT: the trainer checkpointed and returned
      raise SystemExit(f'{name}: interrupted by {summary["interrupted"]} at step '
                       f'{summary["final_step"]}; not recorded (rerun to redo it)')
    records = metrics_lib.read_jsonl(summary['metrics_file'])
    train = [r for r in records if r['split'] == 'train']
    evals = [r for r in records if r['split'] == 'eval']
    step_s = [r['step_s'] for r in train if 'step_s' in r]
    last = train[-1]
    result = dict(
        name=name, **labels, learning_rate=cfg.optim.learning_rate,
        final_val_loss=summary['final_val_loss'], initial_val_loss=summary['initial_val_loss'],
        final_val_accuracy=summary['final_val_accuracy'],
        final_train_loss=summary['final_train_loss'],
        steps_per_s=1.0 / metrics_lib.median(step_s) if step_s else None,
        median_step_s=metrics_lib.median(step_s) if step_s else None,
        skipped_steps=int(last.get('skipped_steps', 0)) + int(last.get('skipped', 0)),
        lr_plateau_scale=last.get('lr_plateau_scale'),
        plateau_reductions=(None if 'lr_plateau_scale' not in last else
                            round(math.log(max(last['lr_plateau_scale'], 1e-30))
                                  / math.log(cfg.optim.plateau_factor))),
        parameters=summary['parameters'],
        wall_s=round(wall, 1), timings=summary.get('timings'),
        optim=config_lib.to_dict(cfg.optim), precision=cfg.model.precision,
        curves={'train_step': [r['step'] for r in train],
                'train_loss': [r['loss'] for r in train],
                'learning_rate': [r.get('learning_rate') for r in train],
                'eval_step': [r['step'] for r in evals],
                'eval_loss': [r['loss'] for r in evals]})
    log(f'{name}: validation loss {result["initial_val_loss"]:.4f} -> '
        f'{result["final_val_loss"]:.4f}, {result["steps_per_s"] or 0:.2f} steps/s, '
        f'{result["skipped_steps"]} skipped, {wall:.0f} s ({summary.get("timings")})')
    tmp = cached + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(result, f)
    os.replace(tmp, cached)
    return result


def shared_tokenizer(base: config_lib.TrainConfig, workdir: str) -> str:
  """Trains (once) the run's SentencePiece model into <workdir>/tokenizer; returns its path."""
  train_docs, _ = pipeline.load_splits(base.data)
  d = base.data
  key = tok_lib.cache_key(train_docs, d.vocab_size, d.tokenizer_max_sentences, d.split_seed)
  path = os.path.join(os.path.abspath(workdir), 'tokenizer', f'spm_{key}.model')
  tok_lib.load_or_train(train_docs, os.path.abspath(workdir), vocab_size=d.vocab_size,
                        max_sentences=d.tokenizer_max_sentences, seed=d.split_seed)
  if not os.path.exists(path):
    raise FileNotFoundError(f'tokenizer training did not write {path}')
  return path


def schedule_optim(xcfg, base_optim: config_lib.OptimConfig, schedule: str, lr: float):
  """The OptimConfig of one schedule row (see the module docstring)."""
  if schedule == 'grad_stats':
    g = xcfg.grad_stats
    return dataclasses.replace(base_optim, learning_rate=lr, schedule=g.base_schedule,
                               grad_lr_scaling=g.grad_lr_scaling,
                               grad_lr_strength=g.grad_lr_strength, spike_k=g.spike_k,
                               spike_min_steps=g.spike_min_steps)
  if schedule == 'plateau':
    p = xcfg.plateau
    return dataclasses.replace(base_optim, learning_rate=lr, schedule=p.base_schedule,
                               plateau=True, plateau_factor=p.plateau_factor,
                               plateau_patience=p.plateau_patience, plateau_rtol=p.plateau_rtol)
  if schedule == 'rsqrt':
    lr = lr * max(base_optim.warmup_steps, 1) ** 0.5
  if schedule == 'wsd':
    base_optim = dataclasses.replace(base_optim, wsd_decay_fraction=xcfg.wsd_decay_fraction)
  # (the cosine row is then exactly the sweep's run, and is reused from the cache)
  return dataclasses.replace(base_optim, learning_rate=lr, schedule=schedule)


def optimizer_optim(base_optim: config_lib.OptimConfig, name: str, lr: float):
  # Plain Adam has no weight decay by definition (config.py rejects one); the others keep 0.01.
  return dataclasses.replace(base_optim, name=name, learning_rate=lr,
                             weight_decay=0.0 if name == 'adam' else base_optim.weight_decay)


def time_precisions(cfg: config_lib.TrainConfig, workdir: str, steps: int, rounds: int) -> dict:
  """Seconds per step of 'f32' and 'bf16' train steps, timed in alternating rounds."""

  mesh, rules = make_mesh(cfg.mesh), get_rules(cfg.mesh.rules)
  train_iter, _, tok = pipeline.make_datasets(cfg.data, cfg.model.arch, workdir, seed=cfg.seed)
  cfg = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=tok.model_vocab_size))
  batches = [pipeline.to_global_batch(next(train_iter), mesh) for _ in range(4)]
  tx = make_optimizer(cfg.optim, None, cfg.num_steps)
  schedule = make_schedule(cfg.optim, cfg.num_steps)
  fns, states = {}, {}
  with step_lib.mesh_context(mesh, rules):
    for policy in ('f32', 'bf16'):
      model_cfg = cfg.model.replace(precision=policy)
      state, sh = state_lib.create_train_state(model_cfg, tx, mesh, rules, cfg.seed)
      fns[policy] = step_lib.jit_train_step(
          model=build_model(model_cfg), tx=tx, state_shardings=sh,
          batch_shardings=step_lib.batch_shardings(mesh, batches[0]), mesh=mesh,
          schedule=schedule)
      t = time.perf_counter()
      state, m = fns[policy](state, batches[0])          # compile
      jax.block_until_ready(m)
      log(f'timing: {policy} train step compiled in {time.perf_counter() - t:.1f} s')
      states[policy] = state
    times = {p: [] for p in fns}
    for _ in range(rounds):
      for policy in fns:
        state = states[policy]
        t = time.perf_counter()
        for i in range(steps):
          state, m = fns[policy](state, batches[i % len(batches)])
        jax.block_until_ready((state, m))
        times[policy].append((time.perf_counter() - t) / steps)
        states[policy] = state
  out = {p: {'median_s_per_step': float(np.median(v)), 'rounds_s_per_step': v}
         for p, v in times.items()}
  out['bf16_over_f32'] = out['bf16']['median_s_per_step'] / out['f32']['median_s_per_step']
  out['steps_per_round'] = steps
  out['device'] = str(jax.devices()[0].device_kind)
  out['cpu_count'] = os.cpu_count()
  out['load_average_1min'] = os.getloadavg()[0]
  return out


def fmt(x, spec):
  return '-' if x is None else format(x, spec)


def markdown(results: dict) -> str:
  base = results['setup']
  out = ['# Optimizers, schedules and precision on t5_tiny / Shakespeare', '',
         f'{base["model"]}, {base["parameters"]:,} parameters; span corruption, batch '
         f'{base["batch_size"]} x {base["inputs_length"]} input tokens, {base["num_steps"]} steps '
         f'(warm-up {base["warmup_steps"]}), validation every {base["eval_every"]} steps on '
         f'{base["eval_batches"]} batches; gradient clipping {base["clip_grad_norm"]}. '
         f'Validation loss at step 0: {base["initial_val_loss"]:.3f}. steps/s: median over the '
         'logging intervals, on a 2-core CPU shared with other jobs (noisy).', '',
         '## Optimizers (cosine schedule, best learning rate of the sweep)', '',
         '| optimizer | learning rate | final val loss | steps/s | skipped steps |',
         '|---|---|---|---|---|']
  for r in results['optimizers']:
    out.append(f'| {r["optimizer"]} | {r["learning_rate"]:g} | {r["final_val_loss"]:.4f} | '
               f'{fmt(r["steps_per_s"], ".2f")} | {r["skipped_steps"]} |')
  out += ['', f'## Schedules ({results["schedule_optimizer"]} at lr '
          f'{results["schedule_lr"]:g})', '',
          '| schedule | peak learning rate | final val loss | steps/s | skipped steps | notes |',
          '|---|---|---|---|---|---|']
  for r in results['schedules']:
    note = r.get('note', '')
    out.append(f'| {r["schedule"]} | {r["learning_rate"]:g} | {r["final_val_loss"]:.4f} | '
               f'{fmt(r["steps_per_s"], ".2f")} | {r["skipped_steps"]} | {note} |')
  out += ['', '## Learning-rate sweep (final validation loss; cosine, same steps)', '',
          '| optimizer | ' + ' | '.join(['lr', 'val loss'] * 3) + ' | best |',
          '|---|' + '---|' * 7]
  for opt, rows in results['sweep'].items():
    cells = ' | '.join(f'{r["learning_rate"]:g} | {r["final_val_loss"]:.4f}' for r in rows)
    pad = ' | ' * (2 * (3 - len(rows)))
    best = min(rows, key=lambda r: r['final_val_loss'])['learning_rate']
    out.append(f'| {opt} | {cells}{pad} | {best:g} |')
  p = results.get('precision')
  if p and p.get('f32') and p.get('bf16') and p.get('timing'):
    t = p['timing']
    out += ['', f'## Precision (same run, adamw cosine, lr {p["f32"]["learning_rate"]:g})', '',
            '| policy | final val loss | s/step (interleaved timing, median) |', '|---|---|---|',
            f'| f32 | {p["f32"]["final_val_loss"]:.4f} | {t["f32"]["median_s_per_step"]:.4f} |',
            f'| bf16 | {p["bf16"]["final_val_loss"]:.4f} | {t["bf16"]["median_s_per_step"]:.4f} |',
            '', f'bf16 / f32 time per step: {t["bf16_over_f32"]:.2f}x on {t["device"]} '
            f'({t["cpu_count"]} cores, 1-min load average {t["load_average_1min"]:.1f} at the '
            f'end). bf16 validation loss differs from f32 by '
            f'{100 * (p["bf16"]["final_val_loss"] / p["f32"]["final_val_loss"] - 1):+.2f}%.']
  if p and p.get('f32') and p.get('bf16'):
    f, b = p['f32'], p['bf16']
    out += ['', f'Same two runs in the trainer (median over logging intervals, not interleaved): '
            f'f32 {fmt(f["median_step_s"], ".4f")} s/step, bf16 {fmt(b["median_step_s"], ".4f")} '
            f's/step; final validation loss f32 {f["final_val_loss"]:.4f}, bf16 '
            f'{b["final_val_loss"]:.4f}.']
  if results.get('not_run'):
    out += ['', 'Not run (time budget of the shared CPU): ' + ', '.join(results['not_run']) + '.']
  return '\n'.join(out) + '\n'


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(18, 5))
  for ax, group, key in ((axes[0], 'optimizers', 'optimizer'), (axes[1], 'schedules', 'schedule')):
    for r in results[group]:
      c = r['curves']
      line, = ax.plot(c['train_step'], c['train_loss'], lw=1.2,
                      label=f'{r[key]} (lr {r["learning_rate"]:g}): {r["final_val_loss"]:.3f}')
      ax.plot(c['eval_step'], c['eval_loss'], 'o', ms=3, color=line.get_color())
    ax.set(xlabel='step', ylabel='loss (lines: train, dots: validation)',
           title=f'{group} (legend: final validation loss)')
    ax.set_ylim(top=min(ax.get_ylim()[1], results['setup']['initial_val_loss'] + 0.2))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  for r in results['schedules']:
    c = r['curves']
    axes[2].plot(c['train_step'], c['learning_rate'], label=r['schedule'])
  axes[2].set(xlabel='step', ylabel='learning rate (incl. adaptive factors)',
              title='schedules: learning rate at each logged step')
  axes[2].legend(fontsize=7)
  axes[2].grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(_WORKDIR.value),
                                                              'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  xcfg = _CONFIG.value
  base = config_lib.from_dict(config_lib.TrainConfig, xcfg.train.to_dict())
  t0 = time.perf_counter()
  runner = Runner(_WORKDIR.value)
  base = dataclasses.replace(base, data=dataclasses.replace(
      base.data, tokenizer=shared_tokenizer(base, _WORKDIR.value)))
  log(f'tokenizer {base.data.tokenizer}')

  sched_opt = xcfg.schedule_optimizer
  if sched_opt not in xcfg.sweep:
    raise ValueError(f'schedule_optimizer={sched_opt!r} is not in the sweep {list(xcfg.sweep)}')
  part, not_run = _PART.value, []

  def run(name, cfg, **labels):
    if _CACHED_ONLY.value and not runner.is_cached(name, cfg):
      not_run.append(name)
      return None
    return runner.run(name, cfg, claim=part != 'all', **labels)

  def sweep_of(names):
    """Round-robin over the sweep values: every optimizer's first value before any second."""
    rows = {n: [] for n in names}
    take = names[::-1] if _REVERSE.value else names
    order = [(n, xcfg.sweep[n][i]) for i in range(max(len(xcfg.sweep[n]) for n in names))
             for n in take if i < len(xcfg.sweep[n])]
    for n, lr in order:
      cfg = dataclasses.replace(base, optim=optimizer_optim(base.optim, n, lr))
      r = run(f'{n}_lr{lr:g}', cfg, group='sweep', optimizer=n, schedule=base.optim.schedule)
      if r is not None:
        rows[n].append(r)
    return {n: sorted(v, key=lambda r: r['learning_rate']) for n, v in rows.items() if v}

  def precision_timing(f32_cfg):
    timing_path = os.path.join(runner.workdir, f'timing-{config_key(f32_cfg)}.json')
    timing = None
    if os.path.exists(timing_path):
      with open(timing_path) as f:
        timing = json.load(f)
    elif not _CACHED_ONLY.value:
      log('timing f32 vs bf16 train steps ...')
      timing = time_precisions(f32_cfg, runner.workdir, xcfg.timing_steps, xcfg.timing_rounds)
      with open(timing_path, 'w') as f:
        json.dump(timing, f)
    if timing:
      log(f'timing: f32 {timing["f32"]["median_s_per_step"]:.4f} s/step, bf16 '
          f'{timing["bf16"]["median_s_per_step"]:.4f} s/step ({timing["bf16_over_f32"]:.2f}x)')
    return timing

  others = [n for n in xcfg.sweep if n != sched_opt]
  if part == 'sweep':
    sweep_of(others)
    log(f'sweep part done in {time.perf_counter() - t0:.0f} s')
    return
  # 'bf16' against 'f32': schedule_optimizer at config.precision_lr (its first sweep value, which
  # runs first), so that the comparison does not wait for the rest of the sweep.
  plr = xcfg.precision_lr
  f32_cfg = dataclasses.replace(base, optim=optimizer_optim(base.optim, sched_opt, plr))
  if part == 'timing':
    precision_timing(f32_cfg)
    return
  f32_run = run(f'{sched_opt}_lr{plr:g}', f32_cfg, group='sweep', optimizer=sched_opt,
                schedule=base.optim.schedule)
  bf16_cfg = dataclasses.replace(f32_cfg, model=f32_cfg.model.replace(precision='bf16'))
  bf16_run = run(f'{sched_opt}_lr{plr:g}_bf16', bf16_cfg, group='precision',
                 optimizer=sched_opt, schedule=base.optim.schedule)
  sweep = sweep_of([sched_opt])
  best_lr = min(sweep[sched_opt], key=lambda r: r['final_val_loss'])['learning_rate']
  best_optim = optimizer_optim(base.optim, sched_opt, best_lr)
  notes = {'rsqrt': f'lr x sqrt(warmup={base.optim.warmup_steps}): same peak',
           'grad_stats': (f'{xcfg.grad_stats.base_schedule}, lr x 1/(1+std/mean of grad norm), '
                          f'skip > mean+{xcfg.grad_stats.spike_k:g} std'),
           'plateau': (f'{xcfg.plateau.base_schedule}, x{xcfg.plateau.plateau_factor:g} after '
                       f'{xcfg.plateau.plateau_patience} eval(s) without a '
                       f'{100 * xcfg.plateau.plateau_rtol:g}% gain')}
  schedules = []
  for sched in xcfg.schedules:
    cfg = dataclasses.replace(base, optim=schedule_optim(xcfg, best_optim, sched, best_lr))
    r = run(f'{sched_opt}_{sched}_lr{best_lr:g}' if sched != base.optim.schedule
            else f'{sched_opt}_lr{best_lr:g}', cfg, group='schedule', optimizer=sched_opt,
            schedule=sched)
    if r is None:
      continue
    r = dict(r, schedule=sched)
    note = notes.get(sched, '')
    if sched == 'plateau' and r.get('plateau_reductions') is not None:
      note += f'; {r["plateau_reductions"]} reduction(s)'
    r['note'] = note
    schedules.append(r)

  timing = precision_timing(f32_cfg)
  if part == 'main':
    log(f'main part done in {time.perf_counter() - t0:.0f} s')
    return
  sweep = {**sweep_of(others), **sweep}
  sweep = {n: sweep[n] for n in xcfg.sweep if n in sweep}
  optimizers = [min(rows, key=lambda r: r['final_val_loss']) for rows in sweep.values()]
  first = optimizers[0]
  results = {
      'setup': dict(model=base.model.name, parameters=first['parameters'], batch_size=base.data.batch_size,
                    inputs_length=base.data.inputs_length, num_steps=base.num_steps,
                    warmup_steps=base.optim.warmup_steps, eval_every=base.eval_every,
                    eval_batches=base.eval_batches, clip_grad_norm=base.optim.clip_grad_norm,
                    data_vocab_size=base.data.vocab_size, corpus=base.data.corpus,
                    initial_val_loss=first['initial_val_loss'],
                    train_config=config_lib.to_dict(base)),
      'sweep': sweep, 'optimizers': optimizers, 'schedule_optimizer': sched_opt,
      'schedule_lr': best_lr, 'schedules': schedules,
      'precision': {'f32': f32_run, 'bf16': bf16_run, 'timing': timing},
      'not_run': not_run,
      'wall_s': round(time.perf_counter() - t0, 1)}
  os.makedirs(_RESULTS.value, exist_ok=True)
  stem = os.path.join(_RESULTS.value, 'optimizers')
  with open(stem + '.json', 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(stem + '.md', 'w') as f:
    f.write(markdown(results))
  plot(results, stem + '.png')
  log(f'wrote {stem}.json, {stem}.md, {stem}.png in {results["wall_s"]:.0f} s')
  print(markdown(results))


if __name__ == '__main__':
  app.run(main)
