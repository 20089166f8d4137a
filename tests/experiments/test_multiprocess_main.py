"""The whole trainer as a multi-process job: experiments/main.py as 2 processes x 4 CPU devices
(jax.distributed on 127.0.0.1, gloo collectives), a checkpoint, a SIGKILL of one process, a
restart of both, and the same final losses as 1 process x 8 devices run uninterrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(ROOT, 'experiments', 'main.py')
TINY = os.path.join(ROOT, 'experiments', 'configs', 'shakespeare.py') + ':tiny'
STEPS, KILL_AFTER = 12, 4
FLAGS = ['--config.data.vocab_size=600', '--config.data.tokenizer_max_sentences=20000',
         '--config.num_samples=0', f'--config.num_steps={STEPS}', '--config.checkpoint_every=4',
         f'--config.eval_every={STEPS}', '--config.log_every=4', '--config.eval_batches=2',
         '--config.async_checkpointing=False']
TIMEOUT_S = 420


def _env(tmp_path, devices):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
             T5LIKE_COMPILATION_CACHE=str(tmp_path / 'jax_cache'))
  return env


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _start(tmp_path, workdir, port, log_name, extra=()):
  procs = []
  for pid in range(2):
    log = open(tmp_path / f'{log_name}_{pid}.log', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, MAIN, f'--config={TINY}', f'--workdir={workdir}', *FLAGS, *extra,
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={pid}'],
        env=_env(tmp_path, 4), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
  return procs


def _logs(tmp_path, name):
  return '\n'.join((tmp_path / f'{name}_{i}.log').read_text()[-2500:] for i in range(2))


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_killed_and_resumed_match_one_process(tmp_path):
  ref_dir = tmp_path / 'one'
  r = subprocess.run([sys.executable, MAIN, f'--config={TINY}', f'--workdir={ref_dir}', *FLAGS],
                     env=_env(tmp_path, 8), capture_output=True, text=True, timeout=TIMEOUT_S,
                     cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  ref = _summary(ref_dir)
  assert ref['final_step'] == STEPS

  workdir = tmp_path / 'two'
  procs = _start(tmp_path, workdir, portpicker.pick_unused_port(), 'first')
  try:
    ckpt = workdir / 'checkpoints' / str(KILL_AFTER)
    deadline = time.time() + TIMEOUT_S
    while not ckpt.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
      time.sleep(0.05)
    assert ckpt.exists(), _logs(tmp_path, 'first')
    procs[1].send_signal(signal.SIGKILL)       # one worker dies...
    procs[1].wait()
    assert procs[0].poll() is None, 'the job finished before a process could be killed'
    time.sleep(2)
  finally:
    _kill(procs)                                # ...and the job is torn down, as a scheduler does
  assert not (workdir / 'summary.json').exists()

  procs = _start(tmp_path, workdir, portpicker.pick_unused_port(), 'second')
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    _kill(procs)
  assert [p.returncode for p in procs] == [0, 0], _logs(tmp_path, 'second')
  logs = _logs(tmp_path, 'second')
  assert 'resumed from' in logs
  out = _summary(workdir)
  assert out['start_step'] >= KILL_AFTER and out['final_step'] == STEPS
  print('1 x 8 final losses: train', ref['final_train_loss'], 'val', ref['final_val_loss'])
  print('2 x 4 final losses: train', out['final_train_loss'], 'val', out['final_val_loss'])
  assert abs(out['final_train_loss'] - ref['final_train_loss']) < 1e-5
  assert abs(out['final_val_loss'] - ref['final_val_loss']) < 1e-5
  # One writer: one metrics file with each step once, progress printed by process 0 only.
  steps = [(r['step'], r['split']) for r in map(json.loads,
           (workdir / 'metrics.jsonl').read_text().splitlines())]
  assert len(steps) == len(set(steps))
  assert f'step {STEPS}/{STEPS}' in (tmp_path / 'second_0.log').read_text()
  assert f'step {STEPS}/{STEPS}' not in (tmp_path / 'second_1.log').read_text()


DISTILL_WORKER = os.path.join(ROOT, 'tests', 'experiments', 'distill_worker.py')


def _last_json(text):
  return json.loads([l for l in text.splitlines() if l.startswith('{')][-1])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_distillation_two_processes_match_one(tmp_path):
  """A student distilled from a teacher through the shared trainer: 2 x 4 equals 1 x 8."""
  r = subprocess.run([sys.executable, DISTILL_WORKER, str(tmp_path / 'one')],
                     env=_env(tmp_path, 8), capture_output=True, text=True, timeout=TIMEOUT_S,
                     cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  ref = _last_json(r.stdout)
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen([sys.executable, DISTILL_WORKER, str(tmp_path / 'two'),
                             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                             f'--process_id={i}'], env=_env(tmp_path, 4), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    _kill(procs)
  assert [p.returncode for p in procs] == [0, 0], [o[-2500:] for o in outs]
  out = _last_json(outs[0])
  print('distillation 1 x 8:', ref, '2 x 4:', out)
  assert out['final_step'] == ref['final_step']
  assert abs(out['final_train_loss'] - ref['final_train_loss']) < 1e-5
  assert abs(out['final_val_loss'] - ref['final_val_loss']) < 1e-5
