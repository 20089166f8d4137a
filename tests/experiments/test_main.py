"""experiments/main.py end to end, in subprocesses: resume after SIGKILL, config and data errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(ROOT, 'experiments', 'main.py')
TINY = os.path.join(ROOT, 'experiments', 'configs', 'shakespeare.py') + ':tiny'
FAST = ['--config.data.vocab_size=600', '--config.num_samples=0', '--config.num_steps=60',
        '--config.checkpoint_every=5', '--config.eval_every=60', '--config.log_every=5',
        '--config.eval_batches=2', '--config.data.tokenizer_max_sentences=20000']


def _env(tmp_path):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''  # one CPU device in the subprocess
  env['T5LIKE_COMPILATION_CACHE'] = str(tmp_path.parent / 'jax_cache')
  return env


def _cmd(workdir, *extra):
  return [sys.executable, MAIN, f'--config={TINY}', f'--workdir={workdir}', *FAST, *extra]


def _run(tmp_path, workdir, *extra, timeout=600):
  return subprocess.run(_cmd(workdir, *extra), env=_env(tmp_path), capture_output=True, text=True,
                        timeout=timeout)


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted_run_and_other_config_fails(tmp_path):
  full = tmp_path / 'full'
  r = _run(tmp_path, full)
  assert r.returncode == 0, r.stderr[-3000:]
  ref = _summary(full)
  assert ref['final_step'] == 60

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(_cmd(killed), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  ckpt = killed / 'checkpoints' / '10'
  deadline = time.time() + 600
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert not (killed / 'summary.json').exists()
  r = _run(tmp_path, killed)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from' in r.stdout
  out = _summary(killed)
  assert out['start_step'] > 0
  assert out['final_step'] == ref['final_step']
  assert abs(out['final_train_loss'] - ref['final_train_loss']) < 1e-5
  assert abs(out['final_val_loss'] - ref['final_val_loss']) < 1e-5
  for name in ('metrics.jsonl', 'curves.png', 'config.json'):
    assert (killed / name).exists()
  assert any((killed / 'tensorboard').iterdir())

  # Another model size in the same workdir: a clear error naming the checkpoint, nothing written.
  before = sorted(os.listdir(full / 'checkpoints'))
  r = _run(tmp_path, full, '--config.model.d_model=32', '--config.num_steps=80')
  assert r.returncode != 0
  assert 'CheckpointError' in r.stderr and 'model.d_model' in r.stderr
  assert 'Traceback' not in r.stderr
  assert str(full / 'checkpoints' / '60') in r.stderr
  assert sorted(os.listdir(full / 'checkpoints')) == before


def test_unknown_override_key_lists_valid_keys(tmp_path):
  r = _run(tmp_path, tmp_path / 'w', '--config.optim.learning_rat=1e-3', timeout=120)
  assert r.returncode != 0
  assert 'learning_rat' in r.stderr and 'learning_rate' in r.stderr


def _corpus(d, kind):
  if kind == 'missing':
    return str(d / 'missing')
  folder = d / kind
  folder.mkdir()
  if kind == 'binary':
    (folder / 'x.txt').write_bytes(bytes(range(256)) * 40)
  return str(folder)


@pytest.mark.parametrize('kind, expect', [('missing', 'missing'), ('empty', 'empty'),
                                          ('binary', 'x.txt')])
def test_bad_corpus_is_a_clear_error(tmp_path, kind, expect):
  corpus = _corpus(tmp_path, kind)
  r = _run(tmp_path, tmp_path / 'w', f'--config.data.corpus={corpus}', timeout=180)
  assert r.returncode != 0
  assert 'CorpusError' in r.stderr and expect in r.stderr
  assert 'Traceback' not in r.stderr  # one clear line, not a stack
