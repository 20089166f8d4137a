"""scripts/launch_tpu_pod.sh: the gcloud commands of the TPU target (dry run; no gcloud here) and
the whole start / status / logs / stop cycle of the local (GPU host) target on a tiny job."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, 'scripts', 'launch_tpu_pod.sh')
TINY = 'experiments/configs/shakespeare.py:tiny'


def _launch(*args, env=None, check=True):
  r = subprocess.run(['bash', LAUNCH, *args], capture_output=True, text=True, env=env,
                     timeout=600, cwd=ROOT)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def test_scripts_parse():
  for name in ('launch_tpu_pod.sh', 'install_jax.sh', 'device_check.sh', 'build_wheel.sh',
               'setup_env.sh'):
    subprocess.run(['bash', '-n', os.path.join(ROOT, 'scripts', name)], check=True)


def test_tpu_dry_run_prints_the_gcloud_commands():
  env = dict(os.environ, TPU_NAME='my-v4-16', ZONE='us-central2-b', PROJECT='proj')
  setup = _launch('--dry_run', 'tpu', 'setup', env=env).stdout.splitlines()
  assert setup[1].startswith('gcloud compute tpus tpu-vm scp ')
  assert '--worker=all' in setup[1] and '--project proj' in setup[1]
  install = setup[-1]
  assert install.startswith('gcloud compute tpus tpu-vm ssh my-v4-16 --zone us-central2-b')
  assert 'setup_env.sh' in install and 'install_jax.sh\\ tpu' in install
  start = _launch('--dry_run', 'tpu', 'start', TINY, 'gs://bucket/run 1', '--config.num_steps=9',
                  env=env).stdout
  assert start.count('\n') == 1 and '--worker=all' in start
  # The workdir is quoted for the remote shell; the job is detached with its own log and pid.
  for part in ('nohup\\ setsid', 'experiments/main.py', 'gs://bucket/run\\\\\\ 1',
               '--config.num_steps=9', 'job.\\$\\(hostname\\).log'):
    assert part in start, (part, start)
  for cmd in ('status', 'logs', 'stop'):
    assert _launch('--dry_run', 'tpu', cmd, env=env).stdout.startswith(
        'gcloud compute tpus tpu-vm ssh my-v4-16')
  r = _launch('--dry_run', 'tpu', 'status', env={'PATH': os.environ['PATH']}, check=False)
  assert r.returncode != 0 and 'TPU_NAME' in r.stderr
  r = _launch('tpu', 'launch', env=env, check=False)
  assert r.returncode == 2 and 'COMMAND' in r.stderr


@pytest.mark.slow
def test_local_start_status_logs_stop(tmp_path):
  env = dict(os.environ, HOME=str(tmp_path), T5LIKE_JOB='t', XLA_FLAGS='', JAX_PLATFORMS='cpu',
             T5LIKE_COMPILATION_CACHE=str(tmp_path / 'cache'))
  workdir = tmp_path / 'run'
  out = _launch('gpu', 'start', TINY, str(workdir), '--config.num_steps=100000',
                '--config.data.vocab_size=600', '--config.data.tokenizer_max_sentences=20000',
                '--config.num_samples=0', '--config.eval_every=100000', '--config.log_every=5',
                env=env).stdout
  assert 'started pid' in out
  log = next((tmp_path / 't5like_logs').glob('t.*.log'))
  deadline = time.time() + 300
  while 'step 10/' not in log.read_text() and time.time() < deadline:
    time.sleep(1)
  assert 'step 10/' in log.read_text(), log.read_text()[-2000:]
  assert 'running (pid' in _launch('gpu', 'status', env=env).stdout
  assert _launch('gpu', 'start', TINY, str(workdir), env=env, check=False).returncode != 0
  assert 'step 10/' in _launch('gpu', 'logs', '200', env=env).stdout
  stopped = _launch('gpu', 'stop', env=env).stdout
  assert 'stopped' in stopped, stopped
  text = log.read_text()
  assert 'SIGTERM: stopped at step' in text, text[-2000:]
  assert 'not running' in _launch('gpu', 'status', env=env).stdout
  assert any(p.name.isdigit() for p in (workdir / 'checkpoints').iterdir())
