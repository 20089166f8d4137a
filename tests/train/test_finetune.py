"""The trainer on a task: task metrics at each evaluation, best checkpoint by a task metric,
init_from a workdir (fresh optimizer, same parameters), bad settings."""
import json
import os

import numpy as np
import pytest

import task_models
from t5like import config as config_lib
from t5like.data.tasks import TaskError
from t5like.train import init_from, loop
from t5like.train import metrics as metrics_lib


@pytest.fixture(scope='module')
def task_file(tmp_path_factory):
  d = tmp_path_factory.mktemp('toytask')
  words = 'the king is dead long live the queen and all her court'.split()
  for split, n in (('train', 64), ('validation', 8)):
    rows = [{'input': ' '.join(words[i % 6:i % 6 + 4]), 'target': ' '.join(words[i % 6:i % 6 + 2])}
            for i in range(n)]
    (d / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  tok = task_models.tiny_tokenizer()
  (d / 'spm.model').write_bytes(tok.model_proto)
  spec = {'tasks': [{'name': 'toy', 'source': {'type': 'folder', 'folder': str(d)},
                     'prefix': 'shorten: '}]}
  (d / 'tasks.json').write_text(json.dumps(spec))
  return d


def _config(task_dir, **kw):
  cfg = config_lib.TrainConfig(
      model=config_lib.get_variant('t5_tiny'),
      data=config_lib.DataConfig(tokenizer=str(task_dir / 'spm.model'), inputs_length=16,
                                 targets_length=8, batch_size=8),
      optim=config_lib.OptimConfig(learning_rate=3e-3, warmup_steps=2),
      task=config_lib.TaskConfig(name='toy', files=(str(task_dir / 'tasks.json'),),
                                 eval_examples=8, best_metric='chrf'),
      num_steps=12, log_every=4, eval_every=4, checkpoint_every=4, eval_batches=1,
      keep_checkpoints=1, keep_best_checkpoints=1, num_samples=0, async_checkpointing=False)
  return config_lib.from_dict(config_lib.TrainConfig,
                              {**config_lib.to_dict(cfg), **kw})


@pytest.fixture(scope='module')
def run(task_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ft') / 'run')
  summary = loop.train(_config(task_file), workdir, print_fn=lambda s: None)
  return workdir, summary


@pytest.mark.slow   # trains a t5_tiny for 12 steps (shared by the module)
def test_task_metrics_logged_and_best_by_chrf(run):
  workdir, summary = run
  evals = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if r.get('split') == 'eval']
  assert [r['step'] for r in evals] == [0, 4, 8, 12]
  assert all({'task/chrf', 'task/bleu', 'task/exact_match', 'loss'} <= set(r) for r in evals)
  # Kept: the latest checkpoint and the best by chrF among the evaluated ones.
  chrf = {r['step']: r['task/chrf'] for r in evals if r['step']}
  best = max(chrf, key=lambda s: (chrf[s], -s))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert best in steps and 12 in steps
  assert init_from.load_pretrained(workdir, 'best').source.endswith(f'/{best}')


@pytest.mark.slow   # trains a t5_tiny for 12 steps (shared by the module)
def test_init_from_workdir_starts_from_its_params(run, task_file, tmp_path):
  workdir, _ = run
  evals = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if r.get('split') == 'eval']
  cfg = _config(task_file, init_from=workdir, init_step='latest', num_steps=4)
  second = str(tmp_path / 'second')
  loop.train(cfg, second, print_fn=lambda s: None)
  first_evals = [r for r in metrics_lib.read_jsonl(os.path.join(second, 'metrics.jsonl'))
                 if r.get('split') == 'eval']
  # Step 0 of the new run evaluates exactly the loaded params: the old run's final numbers.
  assert first_evals[0]['step'] == 0
  assert first_evals[0]['loss'] == pytest.approx(evals[-1]['loss'], rel=1e-5)
  assert first_evals[0]['task/chrf'] == pytest.approx(evals[-1]['task/chrf'])
  saved = json.loads(open(os.path.join(second, 'config.json')).read())
  assert saved['init_from'] == workdir
  # The run keeps init_from's tokenizer, so it can be evaluated and used as init_from itself.
  assert init_from.load_pretrained(second).tokenizer.model_proto == (
      init_from.load_pretrained(workdir).tokenizer.model_proto)


def test_bad_task_settings(task_file, tmp_path):
  with pytest.raises(TaskError, match="unknown task 'nope'"):
    loop.train(_config(task_file, task={'name': 'nope'}), str(tmp_path / 'a'),
               print_fn=lambda s: None)
  with pytest.raises(TaskError, match="best_metric='accuracy' is not a metric"):
    loop.train(_config(task_file, task={'name': 'toy', 'files': [str(task_file / 'tasks.json')],
                                        'best_metric': 'accuracy'}),
               str(tmp_path / 'b'), print_fn=lambda s: None)
  with pytest.raises(config_lib.ConfigError, match='task.length_policy'):
    _config(task_file, task={'name': 'toy', 'length_policy': 'cut'})
  with pytest.raises(init_from.InitFromError, match='does not exist'):
    loop.train(_config(task_file, init_from=str(tmp_path / 'nowhere')), str(tmp_path / 'c'),
               print_fn=lambda s: None)


@pytest.mark.slow   # trains a t5_tiny for 12 steps (shared by the module)
def test_init_from_other_architecture_names_keys(run, task_file, tmp_path):
  workdir, _ = run
  cfg = _config(task_file, init_from=workdir, init_architecture=False,
                model={**config_lib.to_dict(config_lib.get_variant('t5_tiny')), 'd_ff': 96})
  with pytest.raises(init_from.InitFromError, match=r'shape mismatches \[.*mlp/wi/kernel'):
    loop.train(cfg, str(tmp_path / 'd'), print_fn=lambda s: None)
