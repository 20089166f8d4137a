"""`python -m t5like.serve` in a subprocess: SIGTERM with requests in flight."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from t5like.serve import bundle
from tests.serve.conftest import free_port, tiny_params, wait_until


@pytest.fixture
def server(tmp_path, serve_tokenizer):
  # An EOS id the model can never emit: generations run until max_tokens (or the drain ends).
  params, cfg = tiny_params('t5_tiny', 1)
  base_path = tmp_path / 'models'
  bundle.export_bundle(params, cfg.replace(eos_id=cfg.vocab_size), serve_tokenizer,
                       str(base_path / 'endless' / '1'))
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  cmd = [sys.executable, '-m', 't5like.serve', f'--model_base_path={base_path}', f'--port={port}',
         '--num_slots=4', '--prompt_buckets=16', '--max_new_tokens=30000',
         '--drain_timeout_s=3', '--log_level=warning']
  log = open(tmp_path / 'server.log', 'w')
  proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = tmp_path / 'server.log'
  url = f'http://127.0.0.1:{port}'

  def ready():
    assert proc.poll() is None, proc.log_path.read_text()
    try:
      return httpx.get(f'{url}/health/ready', timeout=2).status_code == 200
    except httpx.TransportError:
      return False
  wait_until(ready, timeout=240, every=0.5)
  yield proc, url
  if proc.poll() is None:
    proc.kill()
  proc.wait()
  log.close()
  print(proc.log_path.read_text()[-3000:])


def test_sigterm_drains_then_aborts(server):
  proc, url = server
  results = {}

  started = {'long': threading.Event(), 'short': threading.Event()}

  def stream(key, max_tokens):
    body = {'model': 'endless', 'prompt': [5, 6, 7], 'max_tokens': max_tokens, 'temperature': 0,
            'stream': True}
    events = []
    with httpx.stream('POST', f'{url}/v1/completions', json=body, timeout=60) as r:
      for line in r.iter_lines():
        if line.startswith('data: '):
          events.append(line[6:])
          started[key].set()
    results[key] = (r.status_code, events)

  # Far more tokens than a fast host decodes within the 3 s drain: it must end aborted.
  long = threading.Thread(target=stream, args=('long', 30000))
  long.start()
  assert started['long'].wait(60)     # the long request is generating
  short = threading.Thread(target=stream, args=('short', 60))
  short.start()
  assert started['short'].wait(60)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  # Not ready at once, and new work is refused while the in-flight requests drain.
  r = httpx.get(f'{url}/health/ready', timeout=5)
  assert r.status_code == 503 and r.json()['reason'] == 'shutting down'
  r = httpx.post(f'{url}/v1/completions', json={'model': 'endless', 'prompt': 'x', 'max_tokens': 2},
                 timeout=5)
  assert r.status_code == 503
  long.join(60)
  short.join(60)
  assert proc.wait(timeout=60) == 0
  for key, reason in (('short', ('length',)), ('long', ('abort',))):
    status, events = results[key]
    assert status == 200 and events[-1] == '[DONE]', (key, events[-3:])
    assert json.loads(events[-2])['choices'][0]['finish_reason'] in reason, key
