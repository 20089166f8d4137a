"""experiments/evaluate.py, predict.py and score.py end to end on a tiny workdir (subprocesses)."""
import json
import os
import subprocess
import sys

import pytest

import task_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXP = os.path.join(ROOT, 'experiments')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  tok = task_models.tiny_tokenizer()
  cfg, params = task_models.tiny_model(tok)
  workdir = task_models.save_workdir(str(root / 'run'), cfg, params, tok)
  data = root / 'data'
  data.mkdir()
  rows = [{'input': f'Vpon the Heath {i}', 'target': f'Upon the heath {i}', 'play': 'x'}
          for i in range(5)]
  (data / 'test.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (root / 'tasks.json').write_text(json.dumps({'tasks': [
      {'name': 'toy', 'source': {'type': 'folder', 'folder': str(data)}, 'prefix': 'modernize: '}]}))
  return root, workdir


def _run(root, script, *args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(EXP, script), *args], env=env,
                        capture_output=True, text=True, timeout=600)


def test_evaluate_predict_score(setup):
  root, workdir = setup
  out = root / 'eval'
  r = _run(root, 'evaluate.py', f'--workdir={workdir}', '--task=toy', '--split=test',
           f'--task_file={root / "tasks.json"}', f'--output_dir={out}', '--batch_size=4',
           '--targets_length=8', '--confidence')
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((out / 'metrics_toy_test.json').read_text())
  assert metrics['examples'] == 5 and set(metrics['metrics']) == {'bleu', 'chrf', 'exact_match'}
  assert set(metrics['confidence']['chrf']) == {'score', 'low', 'high'}
  assert 'copy' in metrics['baselines'] and metrics['model'].endswith('checkpoints/1')
  preds = [json.loads(l) for l in (out / 'predictions_toy_test.jsonl').read_text().splitlines()]
  assert [p['input'] for p in preds] == [f'Vpon the Heath {i}' for i in range(5)]
  assert all(set(p) >= {'input', 'target', 'prediction', 'play'} for p in preds)

  (root / 'in.jsonl').write_text('{"input": "Vpon the Heath", "id": 7}\n{"input": "Exeunt"}\n')
  r = _run(root, 'predict.py', f'--workdir={workdir}', '--task=toy', f'--input={root / "in.jsonl"}',
           f'--output={root / "out.jsonl"}', f'--task_file={root / "tasks.json"}',
           '--targets_length=8', '--batch_size=4')
  assert r.returncode == 0, r.stderr[-3000:]
  got = [json.loads(l) for l in (root / 'out.jsonl').read_text().splitlines()]
  assert len(got) == 2 and got[0]['id'] == 7 and isinstance(got[0]['prediction'], str)

  (root / 'pairs.jsonl').write_text('{"input": "Vpon", "target": "Upon"}\n'
                                    '{"input": "Vpon", "target": "Upon the heath"}\n')
  r = _run(root, 'score.py', f'--workdir={workdir}', f'--input={root / "pairs.jsonl"}',
           f'--output={root / "scores.jsonl"}', '--batch_size=4')
  assert r.returncode == 0, r.stderr[-3000:]
  scores = [json.loads(l) for l in (root / 'scores.jsonl').read_text().splitlines()]
  assert all(s['log_likelihood'] < 0 for s in scores)
  assert scores[1]['target_tokens'] > scores[0]['target_tokens']


@pytest.mark.parametrize('script, args, match', [
    ('evaluate.py', ['--task=nope'], "unknown task 'nope'"),
    ('predict.py', ['--task=folio_modernize', '--input={root}/bad.jsonl', '--output={root}/o.jsonl'],
     "bad.jsonl:1 has no string field 'input'"),
    ('score.py', ['--input={root}/empty.jsonl', '--output={root}/o.jsonl'], 'is empty'),
    ('evaluate.py', ['--task=folio_modernize', '--step=9'], 'no checkpoint at step 9'),
])
def test_cli_errors(setup, script, args, match):
  root, workdir = setup
  (root / 'bad.jsonl').write_text('{"text": "a"}\n')
  (root / 'empty.jsonl').write_text('')
  r = _run(root, script, f'--workdir={workdir}', *[a.format(root=root) for a in args])
  assert r.returncode == 1 and match in r.stderr, r.stderr[-2000:]
