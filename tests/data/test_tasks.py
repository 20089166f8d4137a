"""Tasks: registry, task files, mixtures, length policy counts, metrics against sacrebleu."""
import json

import numpy as np
import pytest
from sacrebleu.metrics import BLEU, CHRF

from t5like import config as config_lib
from t5like.data import task_pipeline
from t5like.data.tasks import Mixture, Registry, TaskError
from t5like.data.tasks import metrics


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('task')
  words = 'the king is dead long live the queen and all her court'.split()
  rows = [{'src': ' '.join(words[i % 5:i % 5 + 3 + i % 4]), 'tgt': words[i % 7], 'id': i}
          for i in range(40)]
  _write_jsonl(d / 'train.jsonl', rows[:30])
  _write_jsonl(d / 'dev.jsonl', rows[30:])
  (d / 'test.tsv').write_text('src\ttgt\nthe king\tking\nher court\tcourt\n', encoding='utf-8')
  spec = {'tasks': [{'name': 'toy', 'source': {'type': 'jsonl', 'train': 'train.jsonl',
                                                'validation': 'dev.jsonl', 'test': 'test.tsv',
                                                'input_field': 'src', 'target_field': 'tgt'},
                     'prefix': 'word: ', 'metrics': ['accuracy', 'macro_f1']}],
          'mixtures': [{'name': 'toy_mix', 'tasks': [['toy', 1.0], ['shakespeare_play', 3.0]]}]}
  (d / 'tasks.json').write_text(json.dumps(spec))
  return d


def test_task_file_registers_task_and_mixture(task_dir):
  reg = Registry([str(task_dir / 'tasks.json')])
  assert {'folio_modernize', 'shakespeare_play', 'toy', 'toy_mix'} <= set(reg.names())
  toy = reg.get_task('toy')
  train = toy.examples('train')
  assert len(train) == 30 and train[0].input.startswith('word: ')
  assert train[0].meta['id'] == 0 and train[0].meta['raw_input'] == train[0].input[6:]
  test = toy.examples('test')   # TSV with a header
  assert [(e.input, e.target) for e in test] == [('word: the king', 'king'),
                                                 ('word: her court', 'court')]
  assert [(t.name, r) for t, r in reg.resolve('toy_mix')] == [('toy', 1.0),
                                                              ('shakespeare_play', 3.0)]


def test_folder_source(task_dir, tmp_path):
  spec = {'tasks': [{'name': 'f', 'source': {'type': 'folder', 'folder': str(task_dir),
                                             'input_field': 'src', 'target_field': 'tgt'}}]}
  (tmp_path / 't.json').write_text(json.dumps(spec))
  task = Registry([str(tmp_path / 't.json')]).get_task('f')
  assert len(task.examples('train')) == 30 and len(task.examples('test')) == 2


@pytest.mark.parametrize('spec, match', [
    ({'tasks': [{'name': 'x', 'source': {'type': 'jsonl', 'train': 'missing.jsonl'}}]},
     'does not exist'),
    ({'tasks': [{'name': 'x', 'source': {'type': 'csv', 'train': 'a'}}]}, 'source type'),
    ({'tasks': [{'name': 'x', 'source': {'type': 'jsonl', 'train': 'train.jsonl'},
                 'metrics': ['rouge']}]}, 'unknown metric'),
    ({'tasks': [{'name': 'x', 'source': {'type': 'jsonl', 'train': 'train.jsonl'},
                 'prefx': 'a'}]}, "unknown key.*prefx"),
    ({'mixtures': [{'name': 'm', 'tasks': [['nope', 1.0]]}]}, "unknown task 'nope'"),
    ({'mixtures': [{'name': 'm', 'tasks': [['folio_modernize', 0]]}]}, 'positive'),
])
def test_bad_task_files(task_dir, tmp_path, spec, match):
  for name in ('train.jsonl',):
    (tmp_path / name).write_text((task_dir / name).read_text())
  (tmp_path / 't.json').write_text(json.dumps(spec))
  with pytest.raises(TaskError, match=match):
    reg = Registry([str(tmp_path / 't.json')])
    reg.get_task('x').examples('train')


def test_bad_data_files(tmp_path):
  _write_jsonl(tmp_path / 'train.jsonl', [{'input': 'a', 'target': 'b'}, {'input': 'c'}])
  (tmp_path / 'validation.jsonl').write_text('')
  (tmp_path / 'test.jsonl').write_text('{"input": "a", "target": 3}\n')
  spec = {'tasks': [{'name': 'bad', 'source': {'type': 'folder', 'folder': str(tmp_path)}}]}
  (tmp_path / 't.json').write_text(json.dumps(spec))
  task = Registry([str(tmp_path / 't.json')]).get_task('bad')
  with pytest.raises(TaskError, match=r"train.jsonl:2 has no field 'target'"):
    task.examples('train')
  with pytest.raises(TaskError, match='empty'):
    task.examples('validation')
  with pytest.raises(TaskError, match="'target' is int, not a string"):
    task.examples('test')
  with pytest.raises(TaskError, match="unknown task 'nope'.*registered tasks"):
    Registry().get_task('nope')


def test_play_classification_task():
  task = Registry().get_task('shakespeare_play')
  splits = {s: task.examples(s) for s in ('train', 'validation', 'test')}
  assert len(splits['train']) > 5 * len(splits['test']) > 0
  keys = {s: {(e.meta['play'], e.meta['line']) for e in ex} for s, ex in splits.items()}
  assert not keys['train'] & keys['test'] and not keys['validation'] & keys['test']
  assert {e.target for e in splits['test']} == set(task.labels)


class _CharTokenizer:
  """Ids 3.. for characters: lengths are easy to reason about."""

  def encode(self, text):
    return [3 + (ord(c) % 200) for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


def test_length_policy_counts():
  from t5like.data.tasks import Example
  exs = [Example('a' * n, 'b' * m) for n, m in ((3, 3), (9, 2), (2, 9), (7, 7), (12, 12))]
  lengths = {'encoder': 8, 'decoder': 8}
  kept, counts = task_pipeline.apply_length_policy(exs, _CharTokenizer(), lengths, 'encdec',
                                                   'drop', what='t')
  assert [(len(e.input), len(e.target)) for e in kept] == [(3, 3), (7, 7)]
  assert counts.as_dict() == {'total': 5, 'kept': 2, 'dropped': 3, 'truncated_inputs': 0,
                              'truncated_targets': 0}
  kept, counts = task_pipeline.apply_length_policy(exs, _CharTokenizer(), lengths, 'encdec',
                                                   'truncate', what='t')
  assert len(kept) == 5 and counts.truncated_inputs == 2 and counts.truncated_targets == 2
  a, b, _ = task_pipeline.fit_ids([5] * 12, [6] * 12, lengths, 'encdec', 'truncate')
  assert len(a) == len(b) == 8 and a[-1] == b[-1] == 1
  with pytest.raises(TaskError, match='dropped all'):
    task_pipeline.apply_length_policy(exs[4:], _CharTokenizer(), lengths, 'encdec', 'drop',
                                      what='t')
  with pytest.raises(TaskError, match='length policy'):
    task_pipeline.fit_ids([5], [6], lengths, 'encdec', 'cut')


def test_mixture_pipeline_rates_and_resume(task_dir, tiny_tokenizer):
  reg = Registry([str(task_dir / 'tasks.json')])
  reg.add_mixture(Mixture('toy_twice', (('toy', 1.0), ('toy', 3.0))))
  dc = config_lib.DataConfig(inputs_length=64, targets_length=8, batch_size=4, pack=False)
  it, eval_batches, report = task_pipeline.make_task_datasets(
      reg.resolve('toy_mix'), dc, 'encdec', tiny_tokenizer, process_index=0, process_count=1)
  assert report['counts']['toy/train']['kept'] == 30
  labels = set(reg.get_task('shakespeare_play').labels)
  targets = []
  for _ in range(50):
    b = next(it)
    for row in b['decoder_target_tokens']:
      targets.append(tiny_tokenizer.decode(row))
  frac_play = np.mean([t in labels for t in targets])
  assert 0.6 < frac_play < 0.9   # rate 3 : 1
  state = it.get_state()
  want = next(it)
  it.set_state(state)
  got = next(it)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  rows = sum(b['encoder_input_tokens'].shape[0] for b in eval_batches())
  assert rows >= 10 and rows % 4 == 0


def test_metrics_match_sacrebleu():
  hyps = ['the cat sat on the mat', 'a quick brown fox', 'hello there world', 'to be or not']
  refs = ['the cat sat on a mat', 'the quick brown fox', 'hello world there', 'to be or not']
  assert metrics.bleu(hyps, refs) == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
  assert metrics.chrf(hyps, refs) == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
  assert metrics.exact_match(hyps, refs) == 25.0
  assert metrics.compute(['bleu', 'exact_match'], refs, refs) == {'bleu': pytest.approx(100.0),
                                                                  'exact_match': 100.0}
  # macro-F1 by hand: labels a (tp 1, fp 1, fn 1 -> 0.5), b (tp 1, fp 0, fn 1 -> 2/3), c (0).
  preds, gold = ['a', 'a', 'b', 'c'], ['a', 'b', 'b', 'a']
  assert metrics.macro_f1(preds, gold) == pytest.approx(100 * (0.5 + 2 / 3) / 2)
  assert metrics.macro_f1(preds, gold, labels=['a', 'b', 'c']) == pytest.approx(
      100 * (0.5 + 2 / 3 + 0) / 3)
  with pytest.raises(metrics.MetricError, match='pair up'):
    metrics.bleu(hyps, refs[:2])
  with pytest.raises(metrics.MetricError, match='unknown metric'):
    metrics.compute(['rouge'], hyps, refs)


def test_confidence_and_significance():
  rng = np.random.default_rng(0)
  refs = [' '.join(rng.choice(list('abcdefgh'), 6)) for _ in range(60)]
  good = [r if i % 4 else r[::-1] for i, r in enumerate(refs)]
  bad = [r[::-1] if i % 4 else r for i, r in enumerate(refs)]
  ci = metrics.with_confidence(['chrf', 'exact_match'], good, refs, n_bootstrap=200)
  for m in ci.values():
    assert m['low'] <= m['score'] <= m['high']
  assert ci['exact_match']['score'] == 75.0
  sig = metrics.paired_significance(['chrf', 'exact_match'], good, bad, refs, n_samples=200)
  assert sig['chrf']['delta'] > 0 and sig['chrf']['p_value'] < 0.05
  assert sig['exact_match']['delta'] == 50.0 and sig['exact_match']['p_value'] < 0.05
  same = metrics.paired_significance(['exact_match'], good, good, refs, n_samples=200)
  assert same['exact_match']['p_value'] > 0.5


def test_baselines():
  assert metrics.copy_baseline(['a b', 'c']) == ['a b', 'c']
  assert metrics.majority_baseline(['x', 'y', 'y', 'x', 'z'], 3) == ['x', 'x', 'x']
  with pytest.raises(metrics.MetricError):
    metrics.majority_baseline([], 2)
