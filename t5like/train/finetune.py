"""What the trainer does differently for a task run or a run that starts from pretrained weights.

The trainer (`t5like.train.loop.train`) calls, in order:

  pretrained, config = load_init(config)               # init_from: weights, tokenizer, shapes
  train_iter, eval_batches, tokenizer, report = make_data(config, workdir, pretrained)
  state = init_params(state, shardings, pretrained, config)   # fresh runs only, not on resume
  evaluator = TaskEvaluator(config, tokenizer)          # None unless config.task.name
  metrics = evaluator(params)                           # every eval_every steps

A resumed run restores its own checkpoint: `init_params` applies only to a run's first start.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from t5like.config import ConfigError, TrainConfig
from t5like.data import pipeline
from t5like.data import task_pipeline
from t5like.data import tokenizer as tokenizer_lib
from t5like.data.tasks import Registry, TaskError
from t5like.train import evaluation
from t5like.train import init_from as init_lib

log = logging.getLogger(__name__)

# ModelConfig fields a run keeps from its own config when the architecture comes from init_from.
RUN_MODEL_FIELDS = ('dropout_rate', 'precision', 'remat_policy')


def load_init(config: TrainConfig) -> tuple[init_lib.Pretrained | None, TrainConfig]:
  """(the pretrained weights or None, the config with init_from's architecture if asked)."""
  if not config.init_from:
    return None, config
  pre = init_lib.load_pretrained(config.init_from, config.init_step)
  if config.init_architecture:
    keep = {f: getattr(config.model, f) for f in RUN_MODEL_FIELDS}
    config = dataclasses.replace(config, model=pre.cfg.replace(**keep))
  return pre, config


def _registry(config: TrainConfig, workdir: str) -> Registry:
  return Registry(config.task.files, cache_dir=os.path.join(workdir, 'tasks'))


def make_data(config: TrainConfig, workdir: str, pretrained: init_lib.Pretrained | None):
  """(train_iter, eval_batches, tokenizer, report) for the run: a task's or the corpus'."""
  if not config.task.name:
    if pretrained is None:
      train_iter, eval_batches, tok = pipeline.make_datasets(config.data, config.model.arch,
                                                             workdir, seed=config.seed)
      return train_iter, eval_batches, tok, {}
    raise ConfigError('init_from without task.name: continued pretraining on the corpus is not '
                      'supported; set task.name to fine-tune on a task')
  if pretrained is not None:
    tok = pretrained.tokenizer
    _save_tokenizer(tok, workdir)
  elif config.data.tokenizer:
    tok = tokenizer_lib.Tokenizer.from_file(config.data.tokenizer)
  else:
    train_docs, _ = pipeline.load_splits(config.data)
    tok = tokenizer_lib.load_or_train(train_docs, workdir, vocab_size=config.data.vocab_size,
                                      max_sentences=config.data.tokenizer_max_sentences,
                                      seed=config.data.split_seed)
  tasks = _registry(config, workdir).resolve(config.task.name)
  train_iter, eval_batches, report = task_pipeline.make_task_datasets(
      tasks, config.data, config.model.arch, tok, seed=config.seed,
      length_policy=config.task.length_policy, eval_split=config.task.eval_split)
  return train_iter, eval_batches, tok, report


def _save_tokenizer(tok, workdir: str) -> None:
  # The run's own copy of init_from's tokenizer: evaluation and later init_from read it there.
  folder = os.path.join(workdir, 'tokenizer')
  path = os.path.join(folder, 'spm_init_from.model')
  if not os.path.exists(path):
    os.makedirs(folder, exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
      f.write(tok.model_proto)
    os.replace(tmp, path)


def init_params(state, shardings, pretrained: init_lib.Pretrained | None, config: TrainConfig):
  """`state` with its params replaced by the pretrained ones (placed like `shardings.params`)."""
  if pretrained is None:
    return state
  params = init_lib.merge_params(jax.device_get(state.params), pretrained.params,
                                 partial=config.init_partial, source=pretrained.source)
  return state.replace(params=jax.device_put(params, shardings.params))


class TaskEvaluator:
  """Decodes the task's evaluation examples and scores them (see TaskConfig)."""

  def __init__(self, config: TrainConfig, tokenizer, workdir: str):
    self.config, self.tokenizer = config, tokenizer
    registry = _registry(config, workdir)
    self.task = registry.resolve(config.task.name)[0][0]
    if config.task.best_metric and config.task.best_metric not in self.task.metrics:
      raise TaskError(f'task.best_metric={config.task.best_metric!r} is not a metric of task '
                      f'{self.task.name!r} ({list(self.task.metrics)})')
    self.lengths = task_pipeline.task_lengths(config.data, config.model.arch)

  def __call__(self, params, print_fn=None) -> dict[str, Any]:
    c = self.config
    res = evaluation.evaluate_task(
        params, c.model, self.tokenizer, self.task, c.task.eval_split, lengths=self.lengths,
        batch_size=min(c.data.batch_size, 64), method=c.task.decode, num_beams=c.task.num_beams,
        max_examples=c.task.eval_examples, baselines=False, print_fn=print_fn)
    return {f'task/{k}': v for k, v in res['metrics'].items()}

  def selection_value(self, metrics: dict[str, Any]) -> float | None:
    """The value the best checkpoints are kept by (higher is better), or None."""
    m = self.config.task.best_metric
    return float(metrics[f'task/{m}']) if m else None


def best_checkpoint_options(config: TrainConfig) -> dict[str, str]:
  """Checkpointer options that keep the best checkpoints by task.best_metric (higher is better)."""
  return init_lib.best_checkpoint_options(config.task.best_metric)
