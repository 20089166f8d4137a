"""The compression study: every technique applied to one fine-tuned model on one task, alike.

  study = Study(StudyConfig(...), out_dir, work_dir, save_fn=bundle.export_bundle)
  study.run()        # teacher -> variants -> quality -> speed -> (serving) -> report

One teacher (a task fine-tuned model: `StudyConfig.teacher`, or fine-tuned here first) and the
variants of `variants()`, each built from the teacher (or from another variant: the combinations)
by the library's own transforms:

  reference  the teacher; the teacher fine-tuned for the same extra steps (the control: extra
             training alone must not pass for recovery)
  distil     students at two sizes (every `student_layer_stride`-th layer of the teacher; the
             smaller also keeps `student_ffn_fraction` of its FFN neurons, by surgery), trained
             with soft (temperature), hard and sequence-level targets (t5like/compress/distill.py)
  prune      magnitude, L2-structured, Taylor (gradient), greedy (by loss), N:M, each at three
             sparsities, fine-tuned with the masks fixed (`gradual.keep_masks`); structured and
             greedy masks shrink the model by surgery (t5like/compress/surgery.py)
  dynamic    per-token FFN top-k at run time (t5like/compress/dynamic.py), no training
  share      cross-layer groups (`share.share_layers`) and output-embedding tying, fine-tuned
  quant      int8 per channel, int4 group-wise, int8 with dynamic int8 activations, int4 after
             quantisation-aware fine-tuning (t5like/compress/quantize.py)
  combined   distil -> structured prune (surgery) -> int8; distil -> int4 QAT

Every training stage runs the trainer's `train_step` (t5like/train/step.py) with the technique's
loss (cross-entropy, distillation) and optimizer wrapper (fixed masks), on the same task batches in
the same order, for `finetune_steps` steps per stage. Each built variant is saved through
`save_fn` (the server's bundle format, so that the server can load it), scored on the test split
at once, and recorded in `<out_dir>/results.json` with the time its technique took; a rerun skips
what is recorded (measurements included), so an interrupted study resumes. With
`build_budget_s`, building stops after that long (one variant of each family is built first) and
the built ones go on to the speed measurements (t5like/compress/study_measure.py), serving and
the report and plots (study_report.py); the rerun builds the rest and times everything again.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5like import precision, runtime
from t5like.compress.study_spec import StudyConfig, Variant, selected
from t5like.compress import (distill, gradual, greedy, prune, quantize, share, study_measure,
                             study_report, surgery)
from t5like.config import (ConfigError, DataConfig, DistillConfig, ModelConfig, OptimConfig,
                           PruneConfig, get_variant)
from t5like.data import pipeline, task_pipeline
from t5like.data import tokenizer as tokenizer_lib
from t5like.data.tasks import Registry
from t5like.data.tasks import metrics as metrics_lib
from t5like.models import abstract_params, build_model, init_params, param_count
from t5like.optim import make_optimizer
from t5like.train import evaluation, init_from
from t5like.train import step as step_lib
from t5like.train.state import TrainState

log = logging.getLogger(__name__)

RESULTS_FILE = 'results.json'
# ----------------------------------------------------------------------------- transforms

def drop_layers(params, cfg: ModelConfig, stride: int):
  """(params keeping every `stride`-th layer of each stack (layers 0, stride, ...), its cfg): the
  usual layer-dropping student initialisation."""
  if cfg.shared_layer_groups:
    raise ConfigError('drop_layers needs an unshared model (model.shared_layer_groups=0)')
  for n in ((cfg.num_encoder_layers,) if cfg.is_encdec else ()) + (cfg.num_decoder_layers,):
    if n % stride:
      raise ConfigError(f'student_layer_stride={stride} must divide the layer count {n}')
  flat = traverse_util.flatten_dict(params, sep='/')
  out = {k: (v[::stride] if prune.STACKED in '/' + k else v) for k, v in flat.items()}
  new_cfg = cfg.replace(num_encoder_layers=cfg.num_encoder_layers // stride if cfg.is_encdec
                        else cfg.num_encoder_layers,
                        num_decoder_layers=cfg.num_decoder_layers // stride)
  new = traverse_util.unflatten_dict(out, sep='/')
  want = traverse_util.flatten_dict(abstract_params(new_cfg), sep='/')
  for k, v in out.items():
    if k not in want or tuple(want[k].shape) != tuple(v.shape):
      raise ValueError(f"drop_layers: '{k}' has shape {v.shape}, the student expects "
                       f'{getattr(want.get(k), "shape", None)}')
  return new, new_cfg


def _relative(path: str) -> str:
  """`path` relative to the working directory when under it (results name no machine paths)."""
  rel = os.path.relpath(path)
  return path if rel.startswith('..') else rel


def nonzero_count(params) -> int:
  return int(sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(params)
                 if jnp.issubdtype(x.dtype, jnp.floating)))


# ----------------------------------------------------------------------------- training

def finetune(params, cfg: ModelConfig, train_iter, steps: int, optim_cfg: OptimConfig, *,
             loss: step_lib.Loss | None = None, extra: Any = None,
             wrap_tx: Callable | None = None, seed: int = 0, print_fn=None,
             compiled: dict | None = None, key: Any = None):
  """`steps` updates of the trainer's `train_step` from `params` on `train_iter`'s batches:
  (params, metrics of the last step). `loss` defaults to cross-entropy, `extra` is its extra input
  (the teacher's params), `wrap_tx(tx)` wraps the optimizer (fixed pruning masks).

  `compiled` (a dict) keeps the jitted step under `key` for later calls with the same model
  config, loss and optimizer structure: the masks of `gradual.keep_masks` live in the optimizer
  state, not in its update function, so one compiled step serves every mask."""
  tx = make_optimizer(optim_cfg, None, steps)
  if wrap_tx is not None:
    tx = wrap_tx(tx)
  params = jax.tree.map(jnp.array, params)   # a copy: the state is donated
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(seed),
                     loss_scale=precision.make_loss_scale(precision.get_policy(cfg.precision)))
  full_key = (key, cfg, steps, optim_cfg) if key is not None else None
  fn = compiled.get(full_key) if compiled is not None and full_key is not None else None
  if fn is None:
    fn = jax.jit(functools.partial(step_lib.train_step, model=build_model(cfg), tx=tx, loss=loss),
                 donate_argnums=0)
    if compiled is not None and full_key is not None:
      compiled[full_key] = fn
  m = {}
  t0 = time.perf_counter()
  for i in range(steps):
    batch = {k: jnp.asarray(v) for k, v in next(train_iter).items()}
    state, m = fn(state, batch, extra)
    if print_fn and ((i + 1) % max(1, steps // 4) == 0 or i + 1 == steps):
      m = jax.device_get(m)
      if not np.isfinite(m['loss']):
        raise FloatingPointError(f'fine-tuning diverged at step {i + 1}: loss {m["loss"]}')
      print_fn(f'    step {i + 1}/{steps}: loss {float(m["loss"]):.4f} '
               f'({time.perf_counter() - t0:.0f}s)')
  return jax.device_get(state.params), {k: float(v) for k, v in jax.device_get(m).items()}


# ----------------------------------------------------------------------------- the study

class Study:
  """The study's state: config, data, teacher, built variants and the results JSON."""

  def __init__(self, cfg: StudyConfig, out_dir: str, work_dir: str, *, save_fn: Callable,
               command: str = '', print_fn: Callable[[str], None] = print):
    self.cfg, self.out_dir, self.save_fn, self.print = cfg, os.path.abspath(out_dir), save_fn, print_fn
    self.work = os.path.abspath(work_dir)   # bundles, task cache, tokenizer: not results
    os.makedirs(self.out_dir, exist_ok=True)
    self.bundles = os.path.join(self.work, 'bundles')
    os.makedirs(self.bundles, exist_ok=True)
    self.results = self._load_results()
    self.results['config'] = dataclasses.asdict(cfg)
    if command:
      self.results['command'] = command
    self.variants = selected(cfg)
    self.by_name = {v.name: v for v in self.variants}
    self.results.update(task=cfg.task, order=[v.name for v in self.variants],
                        families={v.name: v.family for v in self.variants},
                        labels={v.name: v.label for v in self.variants})
    self.models: dict[str, tuple[Any, ModelConfig]] = {}
    self._iters: dict[bool, Any] = {}
    self._greedy: dict | None = None
    self._compiled: dict = {}

  # ---- results

  def _load_results(self) -> dict:
    path = os.path.join(self.out_dir, RESULTS_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
    return {'variants': {}}

  def save(self) -> None:
    path = os.path.join(self.out_dir, RESULTS_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(self.results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)

  def record(self, name: str) -> dict:
    return self.results['variants'].setdefault(name, {})

  # ---- data

  def setup(self) -> None:
    """Task, tokenizer and teacher (fine-tuned first if none is given)."""
    c = self.cfg
    self.registry = Registry(c.task_files, cache_dir=os.path.join(self.work, 'tasks'))
    self.task = self.registry.get_task(c.task)
    self.data_cfg = DataConfig(inputs_length=c.inputs_length, targets_length=c.targets_length,
                               batch_size=c.batch_size, pack=True, shuffle_seed=c.seed)
    self.lengths = task_pipeline.task_lengths(self.data_cfg, 'encdec')
    self.optim = OptimConfig(name=c.optimizer, learning_rate=c.learning_rate, warmup_steps=0,
                             schedule='constant', weight_decay=0.0)
    teacher_dir = os.path.join(self.bundles, 'teacher', '1')
    if os.path.isdir(teacher_dir):
      pre = init_from.load_pretrained(teacher_dir)
      self.tokenizer = pre.tokenizer
      self.models['teacher'] = (pre.params, pre.cfg)
      return
    t0 = time.perf_counter()
    rec = self.record('teacher')
    if c.teacher:
      pre = init_from.load_pretrained(c.teacher, c.teacher_step)
      self.tokenizer, params, tcfg = pre.tokenizer, pre.params, pre.cfg
      rec['source'] = _relative(pre.source)
      rec['technique_s'] = 0.0
      rec['steps'] = 0
      rec['extra_steps'] = 0
    else:
      params, tcfg = self._finetune_teacher()
      rec['technique_s'] = time.perf_counter() - t0
      rec['steps'] = c.teacher_steps
      rec['extra_steps'] = 0
    if not tcfg.is_encdec:
      raise ConfigError(f'the study needs an encoder-decoder teacher; {tcfg.name!r} is '
                        'decoder-only')
    params = jax.tree.map(np.asarray, params)
    tcfg = tcfg.replace(dropout_rate=0.0)
    self.save_fn(params, tcfg, self.tokenizer, teacher_dir, source='compress study teacher')
    self.models['teacher'] = (params, tcfg)
    self.save()

  def _finetune_teacher(self):
    c = self.cfg
    if c.teacher_init:
      pre = init_from.load_pretrained(c.teacher_init, 'latest')
      self.tokenizer, params, tcfg = pre.tokenizer, pre.params, pre.cfg
      self.record('teacher')['source'] = f'fine-tuned here from {_relative(pre.source)}'
    else:
      train_docs, _ = pipeline.load_splits(DataConfig())
      self.tokenizer = tokenizer_lib.load_or_train(
          train_docs, self.work, vocab_size=c.tokenizer_vocab_size, max_sentences=20_000,
          seed=c.seed)
      tcfg = get_variant(c.teacher_model, vocab_size=self.tokenizer.model_vocab_size)
      params = init_params(tcfg, jax.random.PRNGKey(c.seed))
      self.record('teacher')['source'] = f'fine-tuned here from a fresh {c.teacher_model}'
    tcfg = tcfg.replace(dropout_rate=0.0)
    self.print(f'fine-tuning the teacher ({param_count(params):,} parameters) for '
               f'{c.teacher_steps} steps on {c.task}')
    optim = dataclasses.replace(self.optim, learning_rate=c.teacher_learning_rate,
                                schedule='cosine', warmup_steps=min(50, c.teacher_steps // 5))
    params, _ = finetune(params, tcfg, self.batches(), c.teacher_steps, optim, seed=c.seed,
                         print_fn=self.print)
    return params, tcfg

  def batches(self, pack: bool = True):
    """A train iterator over the task, rewound: every stage sees the same batches in order."""
    if pack not in self._iters:
      dcfg = dataclasses.replace(self.data_cfg, pack=pack)
      it, eval_batches, report = task_pipeline.make_task_datasets(
          [(self.task, 1.0)], dcfg, 'encdec', self.tokenizer, seed=self.cfg.seed,
          length_policy='drop', eval_split='validation')
      self._iters[pack] = (it, it.get_state())
      if pack:
        self.eval_batches, self.length_report = eval_batches, report
    it, start = self._iters[pack]
    it.set_state(start)
    return it

  def calibration(self) -> list:
    it = self.batches()
    return [{k: jnp.asarray(v) for k, v in next(it).items()}
            for _ in range(self.cfg.calibration_batches)]

  # ---- variants

  def model(self, name: str):
    """(params, cfg) of a built variant (loaded from its saved bundle when not in memory)."""
    if name not in self.models:
      if self.by_name[name].technique == 'dynamic':
        self.models[name] = self.models[self.by_name[name].parent]
      else:
        pre = init_from.load_pretrained(self.bundle_dir(name))
        self.models[name] = (pre.params, pre.cfg)
    return self.models[name]

  def bundle_dir(self, name: str) -> str:
    return os.path.join(self.bundles, name, '1')

  def built(self, name: str) -> bool:
    rec = self.results['variants'].get(name, {})
    return 'technique_s' in rec or 'not_applicable' in rec

  def build_order(self) -> list[Variant]:
    """The variants in build order: one of each family first (so that a run stopped by its
    budget still covers every technique), then the rest; parents always before children."""
    first = ('control', 'int8', 'int4', 'int8_dynamic_act', 'dynamic_ffn_50',
             'prune_magnitude_50', 'prune_structured_50', 'prune_nm_2of4', 'prune_taylor_50',
             'student_a_soft', 'share_layers', 'tie_embeddings', 'int4_qat',
             'student_a_pruned_int8', 'student_a_int4_qat', 'prune_greedy_50', 'student_b_soft')
    head = [self.by_name[n] for n in first if n in self.by_name]
    return head + [v for v in self.variants if v not in head and v.name != 'teacher']

  def build_all(self, t_start: float) -> None:
    """Builds (and scores, right after) every variant not yet recorded, within the budget."""
    self.measure_quality_of('teacher')
    order = self.build_order()
    budget = self.cfg.build_budget_s
    for i, v in enumerate(order):
      if budget and time.perf_counter() - t_start > budget:
        left = [u.name for u in order[i:] if not self.built(u.name)]
        self.results['not_built_within_budget'] = left
        self.print(f'build budget of {budget:.0f}s spent; left for a rerun: {left}')
        return
      if not self.built(v.name):
        self._build(v, i, len(order))
      if 'technique_s' in self.record(v.name):
        self.measure_quality_of(v.name)
      # Each variant compiles its own training and scoring programs; dozens of variants in one
      # process would otherwise reach the kernel's cap on memory mappings.
      runtime.free_compiled_programs()
    self.results.pop('not_built_within_budget', None)

  def _build(self, v: Variant, i: int, n: int) -> None:
    if v.parent in self.by_name and 'not_applicable' in self.record(v.parent):
      self.record(v.name)['not_applicable'] = f'its parent {v.parent} is not applicable'
      return
    self.print(f'[{i + 1}/{n}] building {v.name} ({v.label})')
    t0 = time.perf_counter()
    out = getattr(self, f'_build_{v.technique}')(v)
    rec = self.record(v.name)
    if isinstance(out, str):
      rec['not_applicable'] = out
      self.print(f'    not applicable: {out}')
      self.save()
      return
    params, mcfg, info = out
    rec.update(info)
    rec['technique_s'] = time.perf_counter() - t0
    parent = self.results['variants'].get(v.parent, {})
    rec['extra_steps'] = info.get('steps', 0) + parent.get('extra_steps', 0)
    params = jax.tree.map(np.asarray, params)
    if v.technique != 'dynamic':
      self.save_fn(params, mcfg, self.tokenizer, self.bundle_dir(v.name),
                   source=f'compress study: {v.label}', overwrite=True)
    self.models[v.name] = (params, mcfg)
    self.print(f'    built in {rec["technique_s"]:.0f}s')
    self.save()

  def _ce_finetune(self, params, mcfg, *, wrap_tx=None, pack=True, loss=None, extra=None,
                   key=None):
    """`finetune_steps` on the task; `key` names the (loss, optimizer) kind for step reuse."""
    return finetune(params, mcfg, self.batches(pack), self.cfg.finetune_steps, self.optim,
                    loss=loss, extra=extra, wrap_tx=wrap_tx, seed=self.cfg.seed,
                    print_fn=self.print, compiled=self._compiled, key=key)

  def _build_control(self, v: Variant):
    params, mcfg = self.model(v.parent)
    params, m = self._ce_finetune(params, mcfg, key='ce')
    return params, mcfg, {'steps': self.cfg.finetune_steps, 'final_train_loss': m['loss']}

  def _student_init(self, size: str):
    params, tcfg = self.model('teacher')
    params, scfg = drop_layers(params, tcfg, self.cfg.student_layer_stride)
    if size == 'b':
      pcfg = PruneConfig(method='structured', norm='l2', units='neurons',
                         sparsity=1.0 - self.cfg.student_ffn_fraction)
      masks = prune.compute_masks(params, pcfg)
      params, scfg, _ = surgery.shrink(params, masks, scfg)
    return jax.tree.map(np.asarray, params), scfg

  def _build_distil(self, v: Variant):
    params, scfg = self._student_init(v.opt('size'))
    tparams, tcfg = self.model('teacher')
    dcfg = DistillConfig(kind=v.opt('kind'), alpha=self.cfg.distill_alpha,
                         temperature=self.cfg.distill_temperature)
    loss = distill.distill_loss(dcfg, tcfg)
    params, m = self._ce_finetune(params, scfg, loss=loss, pack=dcfg.kind != 'sequence',
                                  key=('distill', dcfg, tcfg),
                                  extra=jax.tree.map(jnp.asarray, tparams))
    return params, scfg, {'steps': self.cfg.finetune_steps, 'final_train_loss': m['loss'],
                          'student': {'num_layers': scfg.num_decoder_layers, 'd_ff': scfg.d_ff,
                                      'init': 'teacher layers'
                                      + (' + FFN neurons by L2 norm' if v.opt('size') == 'b' else '')}}

  def _masks(self, params, mcfg, method: str, sparsity: float | None, nm: str = ''):
    if method == 'greedy':
      return self._greedy_masks(params, mcfg, sparsity)
    pcfg = PruneConfig(method=method, norm='l2' if method == 'structured' else 'l1',
                       sparsity=sparsity or 0.0, nm=nm, units='both')
    kw = {}
    if method == 'taylor':
      kw = dict(loss_fn=prune.model_loss_fn(mcfg), batches=self.calibration())
    return prune.compute_masks(params, pcfg, **kw)

  def _greedy_masks(self, params, mcfg, sparsity):
    """Greedy unit masks at every study sparsity from one run (it is O(units^2))."""
    if self._greedy is None:
      pcfg = PruneConfig(method='greedy')
      um, history = greedy.greedy_unit_masks(params, prune.model_loss_fn(mcfg),
                                             self.calibration(), sorted(self.cfg.sparsities),
                                             pcfg)
      self._greedy = {s: prune.expand_unit_masks(params, m)
                      for s, m in zip(sorted(self.cfg.sparsities), um)}
      self._greedy_history = history
    return self._greedy[sparsity]

  def _build_prune(self, v: Variant):
    params, mcfg = self.model(v.parent)
    method, s, nm = v.opt('method'), v.opt('sparsity'), v.opt('nm', '')
    masks = jax.tree.map(np.asarray, self._masks(params, mcfg, method, s, nm))
    achieved = prune.sparsity(masks, prune.prunable(params))['total']
    params = prune.apply_masks(params, masks)
    params, m = self._ce_finetune(params, mcfg, wrap_tx=lambda tx: gradual.keep_masks(tx, masks),
                                  key='keep_masks')
    info = {'steps': self.cfg.finetune_steps, 'final_train_loss': m['loss'],
            'sparsity': float(achieved)}
    if method in ('structured', 'greedy'):
      params, mcfg, rep = surgery.shrink(params, masks, mcfg)
      info['surgery'] = {k: v for k, v in rep.items()}
    return params, mcfg, info

  def _build_dynamic(self, v: Variant):
    params, mcfg = self.model(v.parent)
    k = max(1, int(round(mcfg.d_ff * (1.0 - v.opt('sparsity')))))
    return params, mcfg, {'steps': 0, 'ffn_topk': k}

  def _build_share(self, v: Variant):
    params, mcfg = self.model(v.parent)
    groups = v.opt('groups')
    if mcfg.shared_layer_groups == groups:
      return f'the teacher already shares {groups} layer group(s)'
    params, mcfg = share.share_layers(params, mcfg, groups, 'mean')
    params, m = self._ce_finetune(params, mcfg, key='ce')
    return params, mcfg, {'steps': self.cfg.finetune_steps, 'final_train_loss': m['loss']}

  def _build_tie(self, v: Variant):
    params, mcfg = self.model(v.parent)
    if mcfg.tie_embeddings:
      return ('the teacher already ties its output layer to the input embedding '
              '(T5 1.0 layout), so there is nothing to tie')
    params, mcfg = share.tie_output_embedding(params, mcfg, 'average')
    params, m = self._ce_finetune(params, mcfg, key='ce')
    return params, mcfg, {'steps': self.cfg.finetune_steps, 'final_train_loss': m['loss']}

  def _quantize(self, params, mcfg, scheme, act='none', qat=False):
    info = {'steps': 0}
    g = self.cfg.int4_group_size
    fcfg = mcfg.with_quant(group_size=g)
    if qat:
      qcfg = fcfg.with_quant(qat=scheme)
      params, m = self._ce_finetune(params, qcfg, key='ce')
      info.update(steps=self.cfg.finetune_steps, final_train_loss=m['loss'])
    qparams, qcfg = quantize.quantize_params(jax.tree.map(jnp.asarray, params), fcfg, scheme,
                                             group_size=g, activation_quant=act)
    return qparams, qcfg, info

  def _build_quant(self, v: Variant):
    params, mcfg = self.model(v.parent)
    return self._quantize(params, mcfg, v.opt('scheme'), v.opt('act', 'none'), v.opt('qat', False))

  def _build_prune_int8(self, v: Variant):
    params, mcfg = self.model(v.parent)
    masks = jax.tree.map(np.asarray, self._masks(params, mcfg, 'structured', v.opt('sparsity')))
    params = prune.apply_masks(params, masks)
    params, m = self._ce_finetune(params, mcfg, wrap_tx=lambda tx: gradual.keep_masks(tx, masks),
                                  key='keep_masks')
    params, mcfg, rep = surgery.shrink(params, masks, mcfg)
    qparams, qcfg, _ = self._quantize(params, mcfg, 'int8')
    return qparams, qcfg, {'steps': self.cfg.finetune_steps, 'final_train_loss': m['loss'],
                           'surgery': rep}

  # ---- measurements

  def runner(self, name: str) -> study_measure.Runner:
    params, mcfg = self.model(name)
    return study_measure.Runner(name, params, mcfg, self.record(name).get('ffn_topk', 0))

  def live(self) -> list[str]:
    """The built variants (not the inapplicable ones), in study order."""
    return [v.name for v in self.variants if 'technique_s' in self.results['variants'].get(v.name, {})]

  def measure_quality_of(self, name: str) -> None:
    """Test metrics (vs the teacher's predictions), validation loss and sizes of one variant."""
    c = self.cfg
    if not hasattr(self, '_examples'):
      self._examples = study_measure.test_examples(self.task, c.test_examples)
      self.batches()   # builds the validation batches
      refs = [self.task.postprocess_text(e.target) for e in self._examples]
      if 'copy' not in self.results.setdefault('baselines', {}):
        copy = [self.task.postprocess_text(e.meta.get('raw_input', e.input))
                for e in self._examples]
        self.results['baselines']['copy'] = metrics_lib.with_confidence(
            self.task.metrics, copy, refs, c.n_bootstrap)
    pred_dir = os.path.join(self.out_dir, 'predictions')
    os.makedirs(pred_dir, exist_ok=True)
    path = os.path.join(pred_dir, f'{name}.jsonl')
    rec = self.record(name)
    if 'test' in rec and os.path.isfile(path):
      return
    teacher_preds = None
    if name != 'teacher':
      with open(os.path.join(pred_dir, 'teacher.jsonl'), encoding='utf-8') as f:
        teacher_preds = [json.loads(line)['prediction'] for line in f]
    self.print(f'    scoring {name} on {len(self._examples)} test pairs')
    params, mcfg = self.model(name)
    r = self.runner(name)
    q, preds = study_measure.quality(r, self.tokenizer, self.task, self._examples, self.lengths,
                                     c.eval_batch_size, c.n_bootstrap, teacher_preds)
    rec.update(q)
    rec['validation_loss'] = r.validation_loss(self.eval_batches, c.validation_batches)
    rec.update(study_measure.sizes(params, mcfg))
    rec['nonzero_params'] = nonzero_count(params)
    rec['config'] = {k: getattr(mcfg, k) for k in ('num_heads', 'd_ff', 'num_encoder_layers',
                                                   'num_decoder_layers', 'shared_layer_groups',
                                                   'tie_embeddings')}
    rec['config']['quant'] = dataclasses.asdict(mcfg.quant)
    with open(path, 'w', encoding='utf-8') as f:
      for e, p in zip(self._examples, preds):
        f.write(json.dumps({'input': e.input, 'target': e.target, 'prediction': p},
                           ensure_ascii=False) + '\n')
    self.save()

  def measure_speed(self) -> None:
    names = self.live()
    if all('tokens_per_s_b1' in self.record(n) for n in names):
      return
    c = self.cfg
    examples = study_measure.test_examples(self.task, 8)
    rows = evaluation.encode_rows(self.tokenizer, [e.input for e in examples],
                                  self.lengths['encoder'], 'timing inputs')
    self.print(f'  timing {len(names)} variants alternately ({c.timing_rounds} rounds)')
    load = os.getloadavg()
    out = study_measure.speed([self.runner(n) for n in names], rows, self.lengths['decoder'],
                              c.timing_rounds, print_fn=self.print)
    for n, v in out.items():
      self.record(n).update(v)
    self.results['timing'] = {'new_tokens': self.lengths['decoder'], 'rounds': c.timing_rounds,
                              'input_length': self.lengths['encoder'],
                              'load_average_before': list(load),
                              'load_average_after': list(os.getloadavg())}
    self.save()

  def serve(self, load_test_script: str) -> None:
    names = [n for n in self.live() if self.by_name[n].technique != 'dynamic']
    for n in self.live():
      if self.by_name[n].technique == 'dynamic':
        self.record(n)['served'] = {'not_served': 'the server runs dense models; dynamic FFN '
                                    'top-k is a decode-time interception it does not apply'}
    todo = [n for n in names if 'tokens_per_s_c1' not in self.record(n).get('served', {})]
    if not todo:
      return
    c = self.cfg
    self.print(f'  serving {len(names)} bundles from one server, load-testing {len(todo)}')
    load = os.getloadavg()
    self.results['serving'] = {'requests': c.serve_requests}

    def on_result(name, res):
      self.record(name)['served'] = res
      self.save()
    study_measure.serve_and_load_test(
        self.bundles, names, load_test_script, os.path.join(self.out_dir, 'load_test'),
        requests=c.serve_requests, max_tokens=c.serve_max_tokens, prompt_len=c.serve_prompt_len,
        on_result=on_result, test_names=todo, log_path=os.path.join(self.work, 'server.log'),
        print_fn=self.print)
    self.results['serving'] = {'requests': c.serve_requests, 'max_tokens': c.serve_max_tokens,
                               'prompt_len': c.serve_prompt_len, 'models_loaded': len(names),
                               'load_average_before': list(load),
                               'load_average_after': list(os.getloadavg())}
    self.save()

  def run(self, load_test_script: str = '') -> dict:
    """Every stage; what results.json already holds is skipped. Returns the results."""
    t0 = time.perf_counter()
    self.results.setdefault('load_average_at_start', list(os.getloadavg()))
    self.results['jax'] = {'backend': jax.default_backend(), 'devices': jax.device_count(),
                           'cpu_count': os.cpu_count()}
    self.setup()
    self.build_all(t0)
    self.print('measuring decoding speed')
    self.measure_speed()
    if self.cfg.serve and load_test_script:
      self.print('serving')
      self.serve(load_test_script)
    # One entry per invocation: a resumed study lists each part it took.
    self.results.setdefault('wall_s_runs', []).append(time.perf_counter() - t0)
    self.results['load_average_at_end'] = list(os.getloadavg())
    self.results['length_report'] = getattr(self, 'length_report', None)
    for name in self.live():   # sizes by the current definition (cheap; older runs too)
      params, mcfg = self.model(name)
      self.record(name).update(study_measure.sizes(params, mcfg))
    self.save()
    study_report.write(self.results, self.out_dir, self.task.metrics)
    return self.results
