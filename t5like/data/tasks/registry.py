"""Tasks, mixtures and their registry.

A `Task` is a source (`sources.py`) + preprocessing (a text `prefix` put before every input) +
postprocessing of the model's output (`postprocess`) + metrics (`metrics.py`); a classification
task also lists its `labels` (rank classification scores each one). The length policy (drop or
truncate examples longer than the configured lengths) is applied, and counted, by
`t5like.data.task_pipeline`.

A `Mixture` samples from several tasks with given rates.

`Registry` holds named tasks and mixtures: the built-ins (`folio_modernize`, `shakespeare_play`)
plus those of JSON task files. A task file registers tasks without code:

  {"tasks": [{"name": "my_task",
              "source": {"type": "jsonl", "train": "train.jsonl", "validation": "dev.jsonl",
                         "input_field": "src", "target_field": "tgt"},
              "prefix": "translate: ", "metrics": ["bleu", "chrf"], "postprocess": "strip",
              "labels": []}],
   "mixtures": [{"name": "my_mix", "tasks": [["my_task", 1.0], ["folio_modernize", 3.0]]}]}

Source types: "jsonl" / "tsv" / "files" (paths per split, a path or a list), "folder" (a folder of
`<split>*.jsonl|tsv`); relative paths are relative to the task file. Unknown keys, tasks or metric
names are `TaskError`s naming them and the valid choices.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from t5like.data.tasks import metrics as metrics_lib
from t5like.data.tasks import sources
from t5like.data.tasks.sources import Example, TaskError

POSTPROCESS = ('strip', 'none', 'lower')


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  source: Any                               # sources.FileSource / FolioSource / PlaySource
  prefix: str = ''
  metrics: tuple[str, ...] = ('bleu', 'chrf', 'exact_match')
  postprocess: str = 'strip'
  labels: tuple[str, ...] = ()              # classification: the candidate outputs

  def __post_init__(self):
    if not self.name:
      raise TaskError('a task needs a non-empty "name"')
    if self.postprocess not in POSTPROCESS:
      raise TaskError(f'task {self.name!r}: postprocess={self.postprocess!r} is not valid; '
                      f'choose one of {list(POSTPROCESS)}')
    try:
      metrics_lib.check_metric_names(self.metrics, f'task {self.name!r}')
    except metrics_lib.MetricError as e:
      raise TaskError(str(e)) from None

  def preprocess(self, text: str) -> str:
    return self.prefix + text

  def postprocess_text(self, text: str) -> str:
    if self.postprocess == 'strip':
      return text.strip()
    if self.postprocess == 'lower':
      return text.strip().lower()
    return text

  def examples(self, split: str) -> list[Example]:
    """The split's examples with the prefix applied to the inputs (targets as they are)."""
    raw = self.source.examples(split)
    if not raw:
      raise TaskError(f'task {self.name!r} has no {split!r} examples')
    return [Example(self.preprocess(e.input), e.target, {**e.meta, 'raw_input': e.input})
            for e in raw]

  def describe(self) -> dict:
    return {'name': self.name, 'source': self.source.describe(), 'prefix': self.prefix,
            'metrics': list(self.metrics), 'postprocess': self.postprocess,
            'labels': list(self.labels)}


@dataclasses.dataclass(frozen=True)
class Mixture:
  name: str
  tasks: tuple[tuple[str, float], ...]      # (task name, sampling rate)

  def __post_init__(self):
    if not self.tasks:
      raise TaskError(f'mixture {self.name!r} has no tasks')
    for t, rate in self.tasks:
      if not isinstance(rate, (int, float)) or rate <= 0:
        raise TaskError(f'mixture {self.name!r}: rate of {t!r} must be a positive number, got '
                        f'{rate!r}')


def builtin_tasks(cache_dir: str = '') -> dict[str, Task]:
  """The tasks built from the shipped corpus (no download)."""
  return {
      'folio_modernize': Task('folio_modernize', sources.FolioSource(cache_dir),
                              prefix='modernize: ', metrics=('bleu', 'chrf', 'exact_match')),
      'shakespeare_play': Task('shakespeare_play', sources.PlaySource(), prefix='play: ',
                               metrics=('accuracy', 'macro_f1'),
                               labels=tuple(sorted(sources.PLAY_LABELS.values()))),
  }


_TASK_KEYS = {'name', 'source', 'prefix', 'metrics', 'postprocess', 'labels'}


class Registry:
  """Named tasks and mixtures: the built-ins plus those of `task_files` (see the docstring)."""

  def __init__(self, task_files: Sequence[str] = (), cache_dir: str = ''):
    self.tasks: dict[str, Task] = builtin_tasks(cache_dir)
    self.mixtures: dict[str, Mixture] = {}
    for path in task_files:
      self.load_file(path)

  def add_task(self, task: Task) -> None:
    if task.name in self.tasks or task.name in self.mixtures:
      raise TaskError(f'task {task.name!r} is already registered; choose another name')
    self.tasks[task.name] = task

  def add_mixture(self, mixture: Mixture) -> None:
    if mixture.name in self.tasks or mixture.name in self.mixtures:
      raise TaskError(f'mixture {mixture.name!r}: the name is already registered')
    for t, _ in mixture.tasks:
      if t not in self.tasks:
        raise TaskError(f'mixture {mixture.name!r} names unknown task {t!r}; known tasks: '
                        f'{sorted(self.tasks)}')
    self.mixtures[mixture.name] = mixture

  def names(self) -> list[str]:
    return sorted(self.tasks) + sorted(self.mixtures)

  def get_task(self, name: str) -> Task:
    if name not in self.tasks:
      hint = ' (it is a mixture: use it for training only)' if name in self.mixtures else ''
      raise TaskError(f'unknown task {name!r}{hint}; registered tasks: {sorted(self.tasks)}; '
                      'add one with a task file (task.files)')
    return self.tasks[name]

  def resolve(self, name: str) -> list[tuple[Task, float]]:
    """[(task, rate)] of a task (rate 1) or a mixture."""
    if name in self.mixtures:
      return [(self.tasks[t], float(r)) for t, r in self.mixtures[name].tasks]
    return [(self.get_task(name), 1.0)]

  def load_file(self, path: str) -> None:
    try:
      with open(path, encoding='utf-8') as f:
        spec = json.load(f)
    except OSError as e:
      raise TaskError(f'cannot read task file {path!r}: {e.strerror or e}') from None
    except json.JSONDecodeError as e:
      raise TaskError(f'task file {path!r} is not valid JSON: {e}') from None
    if not isinstance(spec, dict) or set(spec) - {'tasks', 'mixtures'}:
      raise TaskError(f'task file {path!r} must be a JSON object with keys "tasks" and/or '
                      '"mixtures"')
    base = os.path.dirname(os.path.abspath(path))
    for k, t in enumerate(spec.get('tasks', [])):
      where = f'{path}: tasks[{k}]'
      if not isinstance(t, dict):
        raise TaskError(f'{where} must be an object')
      unknown = sorted(set(t) - _TASK_KEYS)
      if unknown:
        raise TaskError(f'{where}: unknown key(s) {unknown}; valid keys: {sorted(_TASK_KEYS)}')
      for req in ('name', 'source'):
        if req not in t:
          raise TaskError(f'{where} has no "{req}"')
      self.add_task(Task(str(t['name']), sources.source_from_spec(t['source'], base, where),
                         prefix=t.get('prefix', ''),
                         metrics=tuple(t.get('metrics', ('bleu', 'chrf', 'exact_match'))),
                         postprocess=t.get('postprocess', 'strip'),
                         labels=tuple(t.get('labels', ()))))
    for k, m in enumerate(spec.get('mixtures', [])):
      where = f'{path}: mixtures[{k}]'
      if not isinstance(m, dict) or 'name' not in m or 'tasks' not in m:
        raise TaskError(f'{where} must be an object with "name" and "tasks" ([[task, rate], ...])')
      try:
        pairs = tuple((str(t), r) for t, r in m['tasks'])
      except (TypeError, ValueError):
        raise TaskError(f'{where}: "tasks" must be a list of [task name, rate] pairs') from None
      self.add_mixture(Mixture(str(m['name']), pairs))


def get_task(name: str, task_files: Sequence[str] = (), cache_dir: str = '') -> Task:
  return Registry(task_files, cache_dir).get_task(name)


def describe_all(registry: Registry) -> Mapping[str, Any]:
  return {'tasks': {n: t.describe() for n, t in registry.tasks.items()},
          'mixtures': {n: list(m.tasks) for n, m in registry.mixtures.items()}}
