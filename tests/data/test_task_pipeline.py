"""Task batches: the same global batches whatever the process count, resumable from one state."""
import json

import numpy as np
import pytest

from t5like.config import DataConfig
from t5like.data import task_pipeline
from t5like.data.pipeline import PipelineError
from t5like.data.tasks import Task
from t5like.data.tasks.sources import FileSource


def _task(folder, name, n, word):
  path = folder / f'{name}.jsonl'
  rows = [{'input': f'the {word} of {i} rode to the castle' + ' and back' * (i % 5),
           'target': f'{word} {i}'} for i in range(n)]
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return Task(name, FileSource({'train': (str(path),), 'validation': (str(path),)}))


@pytest.fixture(scope='module')
def mixture(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tasks')
  return [(_task(folder, 'knights', 20, 'knight'), 1.0), (_task(folder, 'queens', 13, 'queen'), 2.0)]


def _make(tasks, tok, cfg, **kw):
  return task_pipeline.make_task_datasets(tasks, cfg, 'encdec', tok, seed=2, **kw)[0]


def _same(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('overrides', [{}, {'pack': False, 'mask_prob': 0.2, 'num_workers': 2}])
def test_task_batches_do_not_depend_on_the_process_count(mixture, tiny_tokenizer, overrides):
  cfg = DataConfig(inputs_length=48, targets_length=8, batch_size=8, **overrides)
  whole = _make(mixture, tiny_tokenizer, cfg, process_index=0, process_count=1)
  parts = [_make(mixture, tiny_tokenizer, cfg, process_index=pi, process_count=2)
           for pi in range(2)]
  assert [p.batch_size for p in parts] == [4, 4] and list(parts[1].rows) == [4, 5, 6, 7]
  seen = set()
  for _ in range(12):   # past an epoch of both tasks
    full, halves = next(whole), [next(p) for p in parts]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), full[k], k)
    seen.update(tiny_tokenizer.decode(r) for r in full['decoder_target_tokens'])
  assert len(seen) > 8   # the fixture varies
  # The state is global: one process count's saved position restores another's.
  state = json.loads(json.dumps(whole.get_state()))
  expected = [next(whole) for _ in range(3)]
  for p in parts:
    p.set_state(state)
  for want in expected:
    halves = [next(p) for p in parts]
    _same({k: np.concatenate([halves[0][k], halves[1][k]]) for k in want}, want)
  fresh = _make(mixture, tiny_tokenizer, cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  for want in expected:
    _same(next(fresh), want)


def test_task_state_of_another_pipeline_is_rejected(mixture, tiny_tokenizer):
  cfg = DataConfig(inputs_length=48, targets_length=8, batch_size=8)
  it = _make(mixture, tiny_tokenizer, cfg, process_index=0, process_count=1)
  other = _make(mixture[:1], tiny_tokenizer, cfg, process_index=0, process_count=1)
  with pytest.raises(PipelineError, match='different pipeline.*tasks'):
    other.set_state(it.get_state())
  with pytest.raises(PipelineError, match='batch_size=8 .* not divisible by the process count 3'):
    _make(mixture, tiny_tokenizer, cfg, process_index=0, process_count=3)
