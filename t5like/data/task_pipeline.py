"""Input pipeline for text-to-text tasks: task examples -> length policy -> tokens -> packed batches.

  train_iter, eval_batches, report = make_task_datasets(tasks, data_cfg, model_arch, tokenizer,
                                                        seed=0, length_policy='drop')

- `tasks`: [(Task, rate)] (`Registry.resolve(name)`: one task, or a mixture's tasks and rates).
- The length policy is explicit and counted: an example whose input (+ EOS) is longer than the
  encoder length S or whose target (+ EOS) is longer than the decoder length T (decoder-only: the
  two together longer than T) is dropped (`'drop'`) or cut to fit (`'truncate'`, EOS kept). The
  counts per task and split are logged and returned in `report`; nothing is cut silently.
  (Counting tokenises each example once; the examples themselves are tokenised again, one at a
  time, inside the grain pipeline, so token ids of the whole task are never held in memory.)
- `train_iter`: the same `t5like.data.pipeline.RowSlotIterator` as pretraining (packing, per-epoch
  shuffle, one global checkpointable position) over a lazily indexed grain `MapDataset` of the
  examples in one global order; a mixture samples its tasks with `MapDataset.mix` at the given
  rates. Each process tokenises only the examples of its own rows, and the global batches do not
  depend on the process count.
- `eval_batches()`: fresh, finite iterators over the first task's validation split (packed, the
  last batch filled with padding rows) for the validation loss.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from t5like.data import augment as augment_lib
from t5like.data import objectives, packing
from t5like.data import pipeline as pipeline_lib
from t5like.data import tokenizer as tokenizer_lib
from t5like.data.tasks import Example, Task, TaskError

log = logging.getLogger(__name__)

LENGTH_POLICIES = ('drop', 'truncate')


@dataclasses.dataclass
class LengthCounts:
  total: int = 0
  kept: int = 0
  dropped: int = 0
  truncated_inputs: int = 0
  truncated_targets: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def _limits(lengths: Mapping[str, int], arch: str) -> tuple[int, int, int]:
  """(max input ids, max target ids, max together), EOS included."""
  if arch == 'encdec':
    return lengths['encoder'], lengths['decoder'], lengths['encoder'] + lengths['decoder']
  T = lengths['decoder']
  return T - 1, T - 1, T


def fit_ids(inputs: Sequence[int], targets: Sequence[int], lengths: Mapping[str, int], arch: str,
            policy: str, eos_id: int = tokenizer_lib.EOS_ID):
  """(input ids + EOS, target ids + EOS, what was cut) or None when the policy drops it."""
  if policy not in LENGTH_POLICIES:
    raise TaskError(f'length policy {policy!r} is not valid; choose one of {list(LENGTH_POLICIES)}')
  max_in, max_tgt, max_both = _limits(lengths, arch)
  n_in, n_tgt = len(inputs) + 1, len(targets) + 1
  over_in = n_in > max_in
  over_tgt = n_tgt > max_tgt
  if arch == 'decoder' and n_in + n_tgt > max_both and not (over_in or over_tgt):
    over_in = True  # the input gives way first in one stream
    max_in = max(1, max_both - n_tgt)
  if not (over_in or over_tgt):
    return list(inputs) + [eos_id], list(targets) + [eos_id], (False, False)
  if policy == 'drop':
    return None
  if arch == 'decoder' and over_tgt:
    max_in = min(max_in, max(1, max_both - max_tgt))
  ids_in = list(inputs)[:max_in - 1] + [eos_id]
  ids_tgt = list(targets)[:max_tgt - 1] + [eos_id]
  return ids_in, ids_tgt, (over_in, over_tgt)


def apply_length_policy(examples: Sequence[Example], tokenizer, lengths: Mapping[str, int],
                        arch: str, policy: str, *, what: str = '') -> tuple[list[Example],
                                                                           LengthCounts]:
  """The examples the policy keeps (all, for 'truncate') and the counts; logs the counts."""
  counts = LengthCounts(total=len(examples))
  kept = []
  ins = tokenizer.encode_batch([e.input for e in examples])
  tgts = tokenizer.encode_batch([e.target for e in examples])
  for e, a, b in zip(examples, ins, tgts):
    out = fit_ids(a, b, lengths, arch, policy)
    if out is None:
      counts.dropped += 1
      continue
    counts.truncated_inputs += out[2][0]
    counts.truncated_targets += out[2][1]
    kept.append(e)
  counts.kept = len(kept)
  if counts.dropped or counts.truncated_inputs or counts.truncated_targets:
    log.warning('length policy %r on %s (lengths %s): %s', policy, what, dict(lengths),
                counts.as_dict())
  else:
    log.info('length policy %r on %s: all %d examples fit %s', policy, what, counts.total,
             dict(lengths))
  if not kept:
    raise TaskError(f'{what}: the length policy {policy!r} dropped all {counts.total} examples '
                    f'(lengths {dict(lengths)}); raise data.inputs_length / targets_length or use '
                    "task.length_policy='truncate'")
  return kept, counts


class EncodeExample:
  """Example -> unpacked model features (tokenised here, one example at a time).

  With an active `augmenter` (training only; called with an rng) the input side is augmented as
  in pretraining (t5like.data.augment): text operations on the raw input (the task prefix is
  kept intact), then token masking / deletion on its ids; the target is never changed.
  """

  def __init__(self, tokenizer, lengths, arch, policy, augmenter=None):
    self.tokenizer, self.lengths, self.arch, self.policy = tokenizer, dict(lengths), arch, policy
    self.augmenter = augmenter

  def _input_ids(self, ex: Example, rng) -> list[int]:
    aug = self.augmenter
    if rng is None or aug is None or not aug.active:
      return self.tokenizer.encode(ex.input)
    raw = ex.meta.get('raw_input', ex.input)
    prefix = ex.input[:len(ex.input) - len(raw)] if ex.input.endswith(raw) else ''
    text = aug.augment_text(raw, rng) if aug.text_active else raw
    ids = aug.augment_tokens(np.asarray(self.tokenizer.encode(prefix + text), np.int32), rng,
                             self.tokenizer.unk_id)
    return [int(i) for i in ids] or self.tokenizer.encode(ex.input)

  def __call__(self, ex: Example, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    out = fit_ids(self._input_ids(ex, rng), self.tokenizer.encode(ex.target), self.lengths,
                  self.arch, 'truncate')  # kept examples already fit under 'drop'
    return objectives.example_features(np.asarray(out[0]), np.asarray(out[1]), self.arch)


def task_lengths(data_cfg, arch: str) -> dict[str, int]:
  """Row lengths of a task: data.inputs_length, and data.targets_length (0: inputs_length)."""
  T = data_cfg.targets_length or data_cfg.inputs_length
  if arch == 'encdec':
    return {'encoder': data_cfg.inputs_length, 'decoder': T}
  if arch == 'decoder':
    return {'decoder': data_cfg.inputs_length + T}
  raise TaskError(f'model arch {arch!r} is not valid; choose one of {list(objectives.ARCHS)}')


def make_task_datasets(tasks: Sequence[tuple[Task, float]], data_cfg, model_arch: str, tokenizer,
                       *, seed: int = 0, length_policy: str = 'drop', eval_split: str = 'validation',
                       process_index: int | None = None, process_count: int | None = None
                       ) -> tuple[pipeline_lib.RowSlotIterator, Callable[[], Iterator[dict]],
                                  dict]:
  """(train_iter, eval_batches factory, report); see the module docstring."""
  if not tasks:
    raise TaskError('no tasks to train on')
  lengths = task_lengths(data_cfg, model_arch)
  pi, pc, local_batch = pipeline_lib._process_shard(process_index, process_count,
                                                    data_cfg.batch_size)
  fn = EncodeExample(tokenizer, lengths, model_arch, length_policy)
  augmenter = augment_lib.Augmenter.from_config(data_cfg)
  train_fn = EncodeExample(tokenizer, lengths, model_arch, length_policy, augmenter)
  report: dict[str, Any] = {'lengths': lengths, 'length_policy': length_policy, 'counts': {}}
  datasets, weights = [], []
  for k, (task, rate) in enumerate(tasks):
    train, counts = apply_length_policy(task.examples('train'), tokenizer, lengths, model_arch,
                                        length_policy, what=f'{task.name}/train')
    report['counts'][f'{task.name}/train'] = counts.as_dict()
    ds = grain.MapDataset.source(train)   # the global order; rows pick their examples from it
    ds = ds.shuffle(seed=pipeline_lib._derive_seed(seed, data_cfg.shuffle_seed, 11 + k))
    if augmenter.active:   # seeded per element index, so per epoch (as in pretraining)
      datasets.append(ds.repeat(None).random_map(
          train_fn, seed=pipeline_lib._derive_seed(seed, data_cfg.augment_seed, 21 + k)))
    else:
      datasets.append(ds.repeat(None).map(fn))
    weights.append(float(rate))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  fingerprint = {'batch_size': data_cfg.batch_size, 'lengths': dict(lengths),
                 'pack': data_cfg.pack, 'tasks': [[t.name, r] for t, r in tasks],
                 'length_policy': length_policy,
                 'num_examples': [c['kept'] for c in report['counts'].values()]}
  train_iter = pipeline_lib.RowSlotIterator(
      ds, lengths, pack=data_cfg.pack, global_batch=data_cfg.batch_size,
      rows=range(pi * local_batch, (pi + 1) * local_batch), fingerprint=fingerprint,
      num_threads=data_cfg.num_workers, process_count=pc)

  first = tasks[0][0]
  val, counts = apply_length_policy(first.examples(eval_split), tokenizer, lengths, model_arch,
                                    length_policy, what=f'{first.name}/{eval_split}')
  report['counts'][f'{first.name}/{eval_split}'] = counts.as_dict()
  cache: list[dict[str, np.ndarray]] = []

  def eval_batches() -> Iterator[dict[str, np.ndarray]]:
    if not cache:
      rows = packing.pack_examples([fn(e) for e in val], lengths, pack=data_cfg.pack)
      rows += [packing.empty_row(lengths, model_arch)] * (-len(rows) % data_cfg.batch_size)
      cache.extend(rows)
    g = data_cfg.batch_size
    for start in range(0, len(cache), g):
      yield packing.stack_rows(cache[start + pi * local_batch:start + (pi + 1) * local_batch])

  return train_iter, eval_batches, report
