"""Optimisers, schedules, augmentation and precision, compared with equal tuning budgets.

  nice -n 19 python experiments/fair_optimizers.py [--config=experiments/configs/fair.py[:smoke]]
      [--workdir=runs/fair] [--results=experiments/results/fair] [--phases=all]

Phases (each reads the previous ones' results):
1. sweep: every optimiser on the same log-spaced grid shape (`grid_points` rates, `grid_step`
   apart, centred on its literature value), cosine schedule, seed 0; while the lowest validation
   loss sits at an edge of the grid, one more rate is added beyond that edge (up to `max_widen`);
   the rate is chosen on the validation split;
2. seeds: the chosen rate of every optimiser again with each other seed (initialisation and data
   order); the ranking uses the test loss, mean and spread over seeds;
3. schedules: the best two optimisers (by mean test loss) at their chosen rates with every
   schedule; 'rsqrt' gets lr * sqrt(warmup) so that its peak equals the others'; 'plateau' and
   'grad_stats' are the constant schedule with reduce-on-plateau / gradient-statistics scaling and
   spike skipping, and how often they acted is counted;
4. folio: the best `folio_optimizers` optimisers at their chosen rates on `folio_modernize`
   (trained from scratch; chrF on the test plays with bootstrap CIs, beside the copy baseline);
5. augment: the best optimiser on folio_modernize without augmentation, with each of masking,
   sentence reordering and syntactic perturbation, and with all three, for every seed;
6. precision: the best optimiser on folio_modernize in f32, bf16, pure_bf16 and fp16 (dynamic loss
   scaling): loss curves, chrF, and seconds per step from alternating timing rounds.

The test split: the corpus' validation plays (data.validation_fraction, split_seed) are split again
by name (`test_fraction`, seed 1): half stay validation, half become the test split, never seen in
training or selection. folio_modernize has its own train / validation / test plays.

How the runs are made cheap enough for a 2-core CPU: one jitted train step per optimiser
structure, reused for every learning rate, seed and (for all but LARS) schedule. The optimiser is
`make_optimizer(config with learning_rate=1)` followed by a multiplier read from the optimiser
state, a table of one value per step: every optimiser here ends in `scale_by_learning_rate` (LARS:
a momentum trace after it, which is linear), so scaling the unit-rate update by lr_t equals the
library optimiser at rate lr_t. For the sweep the inner optimiser keeps the cosine shape and the
table holds the constant peak rate (exact for all); for the schedules phase the inner schedule is
constant and the table holds `make_schedule(config)` at every step (exact except for LARS, whose
momentum would then see the rate: LARS keeps its own schedule); see t5like.optim.lr_table, whose
`check_equivalence` verifies every combination against `make_optimizer(config)` on a small tree before any run. Steps, evaluation,
data and decoding are the library's (`t5like.train.step`, `t5like.data.pipeline` /
`task_pipeline`, `t5like.train.evaluation`).

Outputs under --results: fair.json (every run: config, validation / test loss, chrF with CI,
curves, step times, adaptive counts), fair.md (tables), fair_*.png (plots). Runs are saved to
fair.json as they finish; a rerun skips them (resumable).
"""
import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5like import config as config_lib
from t5like.data import corpus as corpus_lib
from t5like.data import objectives, pipeline, task_pipeline
from t5like.data import tokenizer as tokenizer_lib
from t5like.data.tasks import Registry
from t5like.models import build_model
from t5like.optim import adaptive, make_optimizer, make_schedule
from t5like.optim.lr_table import check_equivalence, plan, scale_by_lr_table, with_table
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.train import evaluation
from t5like.train import fair_report
from t5like.train import state as state_lib
from t5like.train import step as step_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_HERE, 'configs', 'fair.py'), 'Experiment config file[:arg].',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/fair', 'Tokenizer, task cache, jax cache.')
_RESULTS = flags.DEFINE_string('results', os.path.join(_HERE, 'results', 'fair'), 'Output folder.')
_PHASES = flags.DEFINE_list('phases', ['all'], 'sweep, seeds, schedules, folio, augment, '
                            'precision, report, or all.')
PHASES = ('sweep', 'seeds', 'schedules', 'folio', 'augment', 'precision', 'report')


def log(msg: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Data:
  kind: str                     # 'lm' or 'folio'
  data_cfg: config_lib.DataConfig
  tokenizer: Any
  train_iter_fn: Any            # seed -> a fresh training iterator
  eval_batches: dict            # split -> factory of batch iterators
  task: Any = None
  lengths: dict | None = None
  split_names: dict | None = None


def lm_data(base: config_lib.TrainConfig, workdir: str, test_fraction: float) -> Data:
  d = base.data
  docs = corpus_lib.load_documents(d.corpus, text_field=d.text_field, on_bad_file=d.on_bad_file)
  train_docs, held = corpus_lib.split_documents(docs, d.validation_fraction, d.split_seed)
  test_names = corpus_lib.validation_names([x.name for x in held], test_fraction, seed=1)
  val_docs = [x for x in held if x.name not in test_names]
  test_docs = [x for x in held if x.name in test_names]
  if not val_docs or not test_docs:
    raise ValueError(f'the held-out documents {[x.name for x in held]} do not split into '
                     f'validation and test at test_fraction={test_fraction}')
  tok = tokenizer_lib.load_or_train(train_docs, workdir, vocab_size=d.vocab_size,
                                    max_sentences=d.tokenizer_max_sentences, seed=d.split_seed)
  lengths = pipeline.sequence_lengths(d, base.model.arch)
  n = objectives.chunk_length(d.objective, base.model.arch, lengths, d.noise_density,
                              d.mean_noise_span_length)
  chunks = {s: pipeline.make_chunks(x, tok, n) for s, x in
            (('train', train_docs), ('validation', val_docs), ('test', test_docs))}
  log(f'lm data: {len(train_docs)} / {len(val_docs)} / {len(test_docs)} train / validation / '
      f'test documents, {[len(c) for c in chunks.values()]} chunks of {n} ids')
  return Data('lm', d, tok,
              lambda seed: pipeline.make_train_iterator(chunks['train'], d, base.model.arch, tok,
                                                        seed=seed),
              {s: pipeline.make_eval_batches(chunks[s], d, base.model.arch, tok)
               for s in ('validation', 'test')},
              split_names={'validation': [x.name for x in val_docs],
                           'test': [x.name for x in test_docs]})


def folio_data(data_cfg: config_lib.DataConfig, arch: str, tok, workdir: str) -> Data:
  reg = Registry((), cache_dir=os.path.join(workdir, 'tasks'))
  tasks = reg.resolve('folio_modernize')
  lengths = task_pipeline.task_lengths(data_cfg, arch)
  _, val_batches, report = task_pipeline.make_task_datasets(tasks, data_cfg, arch, tok)
  log(f'folio data: {report["counts"]}')

  def train_iter(seed):
    return task_pipeline.make_task_datasets(tasks, data_cfg, arch, tok, seed=seed)[0]

  return Data('folio', data_cfg, tok, train_iter, {'validation': val_batches}, task=tasks[0][0],
              lengths=lengths)


# ----------------------------------------------------------------------------- runs

class Bench:
  """Compiled steps by (data kind, precision, inner optimizer), reused across runs."""

  def __init__(self, base: config_lib.TrainConfig):
    self.base = base
    self.mesh = make_mesh(base.mesh)
    self.rules = get_rules(base.mesh.rules)
    self.compiled: dict = {}

  def _key(self, data: Data, model_cfg, inner: config_lib.OptimConfig, steps: int):
    return (data.kind, model_cfg, inner, steps)

  def get(self, data: Data, model_cfg, inner: config_lib.OptimConfig, steps: int, seed: int):
    key = self._key(data, model_cfg, inner, steps)
    if key not in self.compiled:
      t = time.perf_counter()
      tx = optax.chain(make_optimizer(inner, None, steps), scale_by_lr_table(steps))
      with step_lib.mesh_context(self.mesh, self.rules, self.base.mesh):
        state, sh = state_lib.create_train_state(model_cfg, tx, self.mesh, self.rules, 0)
      batch = next(data.train_iter_fn(0))
      batch_sh = step_lib.batch_shardings(self.mesh, batch)
      model = build_model(model_cfg)
      train_fn = step_lib.jit_train_step(model=model, tx=tx, state_shardings=sh,
                                         batch_shardings=batch_sh, mesh=self.mesh,
                                         schedule=make_schedule(inner, steps))
      eval_fn = step_lib.jit_eval_step(model=model, params_shardings=sh.params,
                                       batch_shardings=batch_sh, mesh=self.mesh)
      self.compiled[key] = dict(tx=tx, sh=sh, train=train_fn, eval=eval_fn, init={},
                                init_s=time.perf_counter() - t)
      self.compiled[key]['init'][0] = jax.device_get(state)
    c = self.compiled[key]
    if seed not in c['init']:
      with step_lib.mesh_context(self.mesh, self.rules, self.base.mesh):
        state, _ = state_lib.create_train_state(model_cfg, c['tx'], self.mesh, self.rules, seed)
      c['init'][seed] = jax.device_get(state)
    return c

  def evaluate(self, c, params, batches, max_batches: int = 0) -> float:
    totals = None
    for i, b in enumerate(batches()):
      if max_batches and i >= max_batches:
        break
      out = c['eval'](params, pipeline.to_global_batch(b, self.mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    return float(totals['loss_sum']) / max(float(totals['weight_sum']), 1.0)

  def run(self, data: Data, model_cfg, optim: config_lib.OptimConfig, *, steps: int, seed: int,
          tabulate_schedule: bool, eval_every: int, eval_batches: int, log_every: int,
          final_splits=('validation', 'test'), keep_state: bool = False) -> dict:
    p = plan(optim, steps, tabulate_schedule)
    c = self.get(data, model_cfg, p.inner, steps, seed)
    t_run = time.perf_counter()
    state = jax.device_put(c['init'][seed], c['sh'])
    state = state.replace(opt_state=jax.device_put(with_table(state.opt_state, p.table),
                                                   c['sh'].opt_state))
    it = data.train_iter_fn(seed)
    curves = {'train_step': [], 'train_loss': [], 'learning_rate': [], 'eval_step': [],
              'eval_loss': [], 'lr_grad_scale': [], 'loss_scale': []}
    val_batches = data.eval_batches['validation']
    step_times, pending, plateau_scales = [], [], []
    with step_lib.mesh_context(self.mesh, self.rules, self.base.mesh):
      v0 = self.evaluate(c, state.params, val_batches, eval_batches)
      curves['eval_step'].append(0)
      curves['eval_loss'].append(v0)
      t_last = None
      for s in range(1, steps + 1):
        state, m = c['train'](state, pipeline.to_global_batch(next(it), self.mesh))
        pending.append(m)
        if s % log_every == 0 or s == steps:
          host = jax.device_get(pending)
          pending = []
          now = time.perf_counter()
          if t_last is not None:     # the first interval includes compilation
            step_times.append((now - t_last) / len(host))
          t_last = now
          for k in ('loss', 'learning_rate'):
            if any(not math.isfinite(float(h[k])) for h in host):
              raise FloatingPointError(f'{k} is not finite at step {s}')
          curves['train_step'].append(s)
          curves['train_loss'].append(float(np.mean([float(h['loss']) for h in host])))
          curves['learning_rate'].append(float(host[-1]['learning_rate']) * float(p.table[s - 1]))
          if 'lr_grad_scale' in host[-1]:
            curves['lr_grad_scale'] += [float(h['lr_grad_scale']) for h in host]
          curves['loss_scale'].append(float(host[-1]['loss_scale']))
          last = host[-1]
        if s % eval_every == 0 or s == steps:
          v = self.evaluate(c, state.params, val_batches, eval_batches)
          curves['eval_step'].append(s)
          curves['eval_loss'].append(v)
          if optim.plateau:
            state = state.replace(opt_state=jax.device_put(
                adaptive.observe_validation(state.opt_state, v), c['sh'].opt_state))
            plateau_scales.append(float(adaptive.optimizer_metrics(
                state.opt_state)['lr_plateau_scale']))
      result = {s: self.evaluate(c, state.params, data.eval_batches[s])
                for s in final_splits if s in data.eval_batches}
    res = dict(learning_rate=optim.learning_rate, seed=seed, steps=steps,
               initial_val_loss=v0, final_val_loss=result.get('validation'),
               test_loss=result.get('test'), final_train_loss=curves['train_loss'][-1],
               median_step_s=float(np.median(step_times)) if step_times else None,
               wall_s=round(time.perf_counter() - t_run, 1),
               first_compile_s=round(c['init_s'], 1),
               skipped_steps=int(last.get('skipped_steps', 0)) + int(last.get('skipped', 0)),
               optim=config_lib.to_dict(optim), precision=model_cfg.precision,
               lr_realisation='table of the schedule' if p.inner.schedule != optim.schedule
               or p.inner.warmup_steps != optim.warmup_steps else 'constant multiplier',
               curves=curves)
    if optim.plateau:
      opt_m = adaptive.optimizer_metrics(state.opt_state)
      res['plateau_reductions'] = sum(b < a for a, b in zip([1.0] + plateau_scales,
                                                             plateau_scales))
      res['plateau_scales'] = plateau_scales
      res['final_plateau_scale'] = float(opt_m['lr_plateau_scale'])
    if optim.grad_lr_scaling != 'none':
      g = np.asarray(curves['lr_grad_scale'])
      res['grad_scale'] = dict(mean=float(g.mean()), min=float(g.min()),
                               steps_below_0_9=int((g < 0.9).sum()),
                               steps_below_0_99=int((g < 0.99).sum()))
    if keep_state:
      res['_params'] = state.params
    return res


# ----------------------------------------------------------------------------- the experiment

class Store:
  """fair.json: runs by name, written after every run (atomic), so a killed run loses nothing."""

  def __init__(self, path: str):
    self.path = path
    self.data = {'runs': {}}
    if os.path.exists(path):
      with open(path) as f:
        self.data = json.load(f)

  def __contains__(self, name):
    return name in self.data['runs']

  def __getitem__(self, name):
    return self.data['runs'][name]

  def put(self, name, result):
    self.data['runs'][name] = {k: v for k, v in result.items() if not k.startswith('_')}
    self.save()

  def save(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.data, f, indent=1, sort_keys=True)
    os.replace(tmp, self.path)


def optimizer_optim(base: config_lib.OptimConfig, name: str, lr: float):
  # Plain Adam has no weight decay by definition (config.py rejects one); the others keep 0.01.
  return dataclasses.replace(base, name=name, learning_rate=lr,
                             weight_decay=0.0 if name == 'adam' else base.weight_decay)


def schedule_optim(xcfg, optim: config_lib.OptimConfig, schedule: str):
  if schedule == 'plateau':
    return dataclasses.replace(optim, schedule='constant', plateau=True, **xcfg.plateau.to_dict())
  if schedule == 'grad_stats':
    return dataclasses.replace(optim, schedule='constant', **xcfg.grad_stats.to_dict())
  if schedule == 'rsqrt':   # same peak as the others (T5's flat warm-up at lr / sqrt(warmup))
    return dataclasses.replace(optim, schedule='rsqrt',
                               learning_rate=optim.learning_rate * max(optim.warmup_steps, 1) ** 0.5)
  if schedule == 'wsd':
    return dataclasses.replace(optim, schedule='wsd', wsd_decay_fraction=xcfg.wsd_decay_fraction)
  return dataclasses.replace(optim, schedule=schedule)


def lr_at(center: float, step: float, i: int) -> float:
  """The grid's i-th rate: center * step**i (3 significant digits)."""
  return float(f'{center * step ** i:.3g}')


def mean_std(xs):
  xs = [x for x in xs if x is not None]
  return (float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


class Experiment:

  def __init__(self, xcfg, workdir: str, results: str):
    self.x = xcfg
    self.base = config_lib.from_dict(config_lib.TrainConfig, xcfg.train.to_dict())
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.results = results
    self.store = Store(os.path.join(results, 'fair.json'))
    self.bench = Bench(self.base)
    self._lm = self._folio = None
    self.model_cfg = None
    self.checked = set()

  # data, built on first use
  def lm(self) -> Data:
    if self._lm is None:
      self._lm = lm_data(self.base, self.workdir, self.x.test_fraction)
      self.model_cfg = self.base.model.replace(vocab_size=self._lm.tokenizer.model_vocab_size)
      self.store.data['lm_split'] = self._lm.split_names
    return self._lm

  def folio(self) -> Data:
    if self._folio is None:
      lm = self.lm()
      f = self.x.folio
      dcfg = dataclasses.replace(self.base.data, inputs_length=f.inputs_length,
                                 targets_length=f.targets_length)
      self._folio = folio_data(dcfg, self.base.model.arch, lm.tokenizer, self.workdir)
    return self._folio

  def _check(self, optim, steps, tabulate):
    key = (optim.name, optim.schedule, optim.plateau, optim.grad_lr_scaling, steps, tabulate)
    if key not in self.checked:
      rel = check_equivalence(optim, plan(optim, steps, tabulate), steps)
      log(f'check: {optim.name}/{optim.schedule}'
          f'{"/plateau" if optim.plateau else ""}{"/grad_stats" if optim.grad_lr_scaling != "none" else ""}'
          f' realised as make_optimizer (max relative difference {rel:.1e})')
      self.checked.add(key)

  def run(self, name: str, data_fn, optim, *, seed=0, steps=None, tabulate=True, model_cfg=None,
          eval_every=None, data_override=None, chrf=False, **labels):
    if name in self.store:
      return self.store[name]
    data = data_override or data_fn()
    steps = steps or self.base.num_steps
    self._check(optim, steps, tabulate)
    mcfg = model_cfg or self.model_cfg
    log(f'{name}: {optim.name} lr {optim.learning_rate:g} {optim.schedule} seed {seed} ...')
    r = self.bench.run(data, mcfg, optim, steps=steps, seed=seed, tabulate_schedule=tabulate,
                       eval_every=eval_every or self.base.eval_every,
                       eval_batches=self.base.eval_batches, log_every=self.base.log_every,
                       keep_state=chrf)
    if chrf:
      t = time.perf_counter()
      ev = evaluation.evaluate_task(jax.device_get(r.pop('_params')), mcfg, data.tokenizer,
                                    data.task, 'test', lengths=data.lengths, batch_size=64,
                                    max_examples=self.x.folio_eval_examples, confidence=True,
                                    n_bootstrap=1000, baselines=True)
      r['test_metrics'] = ev['metrics']
      r['test_confidence'] = ev['confidence']
      r['copy_baseline'] = ev['baselines']['copy']
      r['test_examples'] = ev['examples']
      r['examples_shown'] = ev['predictions'][:3]
      r['decode_s'] = round(time.perf_counter() - t, 1)
    r.update(name=name, **labels)
    self.store.put(name, r)
    extra = (f', chrF {r["test_metrics"]["chrf"]:.2f} [{r["test_confidence"]["chrf"]["low"]:.2f}, '
             f'{r["test_confidence"]["chrf"]["high"]:.2f}]' if chrf else '')
    log(f'{name}: val {r["final_val_loss"]:.4f} test {r["test_loss"] or float("nan"):.4f}{extra}'
        f' ({r["wall_s"]:.0f} s, {r["median_step_s"] or 0:.3f} s/step)')
    return r

  # phase 1
  def sweep(self):
    x, out = self.x, {}
    for name in x.optimizers:
      c, half = x.literature_lr[name], (x.grid_points - 1) // 2
      lo, hi = -half, x.grid_points - 1 - half
      lrs = [lr_at(c, x.grid_step, i) for i in range(lo, hi + 1)]
      rows = {}
      widened = 0
      while True:
        for lr in lrs:
          if lr not in rows:
            optim = optimizer_optim(self.base.optim, name, lr)
            rows[lr] = self.run(f'sweep/{name}/lr{lr:g}', self.lm, optim, tabulate=False,
                                group='sweep', optimizer=name)
        order = sorted(rows)
        best = min(order, key=lambda lr: rows[lr]['final_val_loss'])
        if widened >= x.max_widen or order[0] < best < order[-1]:
          break
        if best == order[0]:
          lo -= 1
          lrs = [lr_at(c, x.grid_step, lo)]
        else:
          hi += 1
          lrs = [lr_at(c, x.grid_step, hi)]
        widened += 1
        log(f'sweep {name}: best {best:g} at the edge of {order}; adding {lrs[0]:g}')
      out[name] = dict(grid=sorted(rows), best_lr=best, interior=order[0] < best < order[-1],
                       widened=widened)
    self.store.data['sweep'] = out
    self.store.save()
    return out

  # phase 2
  def seeds(self):
    sweep = self.store.data['sweep']
    summary = {}
    for name in self.x.optimizers:
      lr = sweep[name]['best_lr']
      runs = [self.store[f'sweep/{name}/lr{lr:g}']]
      for seed in self.x.seeds[1:]:
        optim = optimizer_optim(self.base.optim, name, lr)
        runs.append(self.run(f'seed/{name}/lr{lr:g}/s{seed}', self.lm, optim, seed=seed,
                             tabulate=False, group='seed', optimizer=name))
      tm, ts = mean_std([r['test_loss'] for r in runs])
      vm, vs = mean_std([r['final_val_loss'] for r in runs])
      summary[name] = dict(learning_rate=lr, test_mean=tm, test_std=ts, val_mean=vm, val_std=vs,
                           seeds=[r['seed'] for r in runs],
                           test=[r['test_loss'] for r in runs])
    self.store.data['optimizers'] = summary
    self.store.save()
    return summary

  def ranking(self):
    s = self.store.data['optimizers']
    return sorted(s, key=lambda n: s[n]['test_mean'])

  # phase 3
  def schedules(self):
    out = {}
    for name in self.ranking()[:2]:
      lr = self.store.data['optimizers'][name]['learning_rate']
      base = optimizer_optim(self.base.optim, name, lr)
      for sched in self.x.schedules:
        optim = schedule_optim(self.x, base, sched)
        runs = []
        for seed in self.x.seeds:
          if sched == 'cosine' and seed == 0:
            runs.append(self.store[f'sweep/{name}/lr{lr:g}'])
            continue
          runs.append(self.run(f'schedule/{name}/{sched}/s{seed}', self.lm, optim, seed=seed,
                               tabulate=True, group='schedule', optimizer=name, schedule=sched))
        tm, ts = mean_std([r['test_loss'] for r in runs])
        row = dict(optimizer=name, schedule=sched, peak_lr=optim.learning_rate, test_mean=tm,
                   test_std=ts, test=[r['test_loss'] for r in runs],
                   val_mean=mean_std([r['final_val_loss'] for r in runs])[0],
                   runs=[r['name'] for r in runs])
        if sched == 'plateau':
          row['plateau_reductions'] = [r['plateau_reductions'] for r in runs]
        if sched == 'grad_stats':
          row['grad_scale'] = [r['grad_scale'] for r in runs]
          row['skipped_steps'] = [r['skipped_steps'] for r in runs]
        out[f'{name}/{sched}'] = row
    self.store.data['schedules'] = out
    self.store.save()

  def folio_optim(self, name):
    lr = self.store.data['optimizers'][name]['learning_rate']
    optim = optimizer_optim(self.base.optim, name, lr)
    return dataclasses.replace(optim, warmup_steps=self.x.folio.warmup_steps)

  # phase 4
  def folio_phase(self):
    out = {}
    for name in self.ranking()[:self.x.folio_optimizers]:
      r = self.run(f'folio/{name}/s0', self.folio, self.folio_optim(name), steps=self.x.folio_steps,
                   tabulate=False, chrf=True, group='folio', optimizer=name)
      out[name] = r['name']
    self.store.data['folio'] = out
    self.store.save()

  def best_folio(self):
    f = self.store.data['folio']
    return max(f, key=lambda n: self.store[f[n]]['test_metrics']['chrf'])

  # phase 5
  def augment(self):
    name = self.best_folio()
    optim = self.folio_optim(name)
    out = {}
    for aug, probs in self.x.augmentations.items():
      for seed in self.x.seeds:
        run_name = f'augment/{name}/{aug}/s{seed}'
        if aug == 'none' and seed == 0:
          r = self.store[self.store.data['folio'][name]]
        else:
          dcfg = dataclasses.replace(self.folio().data_cfg, **dict(probs))
          data = (self.folio() if aug == 'none' else
                  folio_data(dcfg, self.base.model.arch, self.lm().tokenizer, self.workdir))
          data.kind = 'folio'   # same shapes: the compiled step is shared
          r = self.run(run_name, None, optim, seed=seed, steps=self.x.folio_steps,
                       tabulate=False, chrf=True, data_override=data, group='augment',
                       optimizer=name, augmentation=aug, probs=dict(probs))
        out.setdefault(aug, []).append(r['name'])
    self.store.data['augment'] = {'optimizer': name, 'runs': out}
    self.store.save()

  # phase 6
  def precision(self):
    name = self.best_folio()
    optim = self.folio_optim(name)
    out = {}
    for pol in self.x.precisions:
      if pol == 'f32':
        out[pol] = self.store.data['folio'][name]
        continue
      mcfg = self.model_cfg.replace(precision=pol)
      r = self.run(f'precision/{name}/{pol}', self.folio, optim, steps=self.x.folio_steps,
                   tabulate=False, chrf=True, model_cfg=mcfg, group='precision', optimizer=name,
                   policy=pol)
      out[pol] = r['name']
    timing_key = f'timing/{name}'
    if timing_key not in self.store.data:
      self.store.data[timing_key] = self.time_precisions(optim)
    self.store.data['precision'] = {'optimizer': name, 'runs': out, 'timing': timing_key}
    self.store.save()

  def time_precisions(self, optim):
    """Seconds per train step of each policy, in alternating rounds (a shared machine's load
    then falls on all of them alike)."""
    data = self.folio()
    p = plan(optim, self.x.folio_steps, False)
    batches = [pipeline.to_global_batch(b, self.bench.mesh)
               for b, _ in zip(data.train_iter_fn(0), range(4))]
    fns, states = {}, {}
    with step_lib.mesh_context(self.bench.mesh, self.bench.rules, self.base.mesh):
      for pol in self.x.precisions:
        c = self.bench.get(data, self.model_cfg.replace(precision=pol), p.inner,
                           self.x.folio_steps, 0)
        st = jax.device_put(c['init'][0], c['sh'])
        fns[pol] = c['train']
        st, m = fns[pol](st, batches[0])     # warm (compiled already by the runs)
        jax.block_until_ready(m)
        states[pol] = st
      times = {pol: [] for pol in fns}
      for _ in range(self.x.timing_rounds):
        for pol in fns:
          st = states[pol]
          t = time.perf_counter()
          for i in range(self.x.timing_steps):
            st, m = fns[pol](st, batches[i % len(batches)])
          jax.block_until_ready((st, m))
          times[pol].append((time.perf_counter() - t) / self.x.timing_steps)
          states[pol] = st
    out = {pol: {'median_s_per_step': float(np.median(v)), 'rounds_s_per_step': v}
           for pol, v in times.items()}
    out.update(steps_per_round=self.x.timing_steps, rounds=self.x.timing_rounds,
               device=str(jax.devices()[0].device_kind), cpu_count=os.cpu_count(),
               load_average_1min=os.getloadavg()[0])
    return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_compilation_cache_dir', os.path.join(os.path.abspath(_WORKDIR.value),
                                                              'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  phases = PHASES if 'all' in _PHASES.value else tuple(_PHASES.value)
  unknown = set(phases) - set(PHASES)
  if unknown:
    raise app.UsageError(f'--phases: unknown {sorted(unknown)}; choose from {list(PHASES)} or all')
  t0 = time.perf_counter()
  ex = Experiment(_CONFIG.value, _WORKDIR.value, _RESULTS.value)
  ex.lm()
  steps = {'sweep': ex.sweep, 'seeds': ex.seeds, 'schedules': ex.schedules,
           'folio': ex.folio_phase, 'augment': ex.augment, 'precision': ex.precision}
  for ph in PHASES:
    if ph in phases and ph in steps:
      t = time.perf_counter()
      steps[ph]()
      wall = ex.store.data.setdefault('phase_wall_s', {})
      wall[ph] = round(wall.get(ph, 0.0) + time.perf_counter() - t, 1)
      ex.store.save()
      log(f'phase {ph} done in {time.perf_counter() - t:.0f} s')
  if 'report' in phases:
    fair_report.write(ex.store.data, ex.results, _CONFIG.value)
  log(f'done in {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  app.run(main)
