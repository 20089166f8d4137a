"""Hostile and malformed input: every one a 4xx in OpenAI's shape, never a crash, never a new
metric label, never a blocked event loop; no filesystem path shown to clients."""
import json
import threading
import time
import urllib.parse

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from t5like.serve.app import create_app
from tests.serve.conftest import MAX_BODY

JSON = {'content-type': 'application/json'}


def raw(live, body: bytes, path='/v1/completions', **kw):
  return live.client.post(path, content=body, headers={**JSON, **kw.pop('headers', {})}, **kw)


def assert_openai_error(r, status, param=None):
  assert r.status_code == status, r.text
  err = r.json()['error']
  assert set(err) == {'message', 'type', 'param', 'code'} and err['message'], err
  if param is not None:
    assert err['param'] == param, err
  return err


HOSTILE = [
    ('lone surrogate in prompt', b'{"model": "tiny", "prompt": "ab\\ud800cd"}', 'prompt'),
    ('lone low surrogate in stop', b'{"model": "tiny", "prompt": "x", "stop": ["\\udfff"]}',
     'stop'),
    ('lone surrogate in model', b'{"model": "\\ud83d", "prompt": "x"}', 'model'),
    ('lone surrogate in a key', b'{"model": "tiny", "prompt": "x", "\\ud800": 1}', None),
    ('lone surrogate in a chat message',
     b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ('invalid utf-8', b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
    ('deep nesting', b'[' * 100_000 + b']' * 100_000, None),
    ('deep nesting in an object', b'{"model": "tiny", "prompt": "x", "u": ' + b'[' * 200
     + b']' * 200 + b'}', None),
    ('giant integer literal', b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b'9' * 5000
     + b'}', None),
    ('NaN', b'{"model": "tiny", "prompt": "x", "temperature": NaN}', None),
    ('Infinity', b'{"model": "tiny", "prompt": "x", "top_p": -Infinity}', None),
    ('float overflow', b'{"model": "tiny", "prompt": "x", "temperature": 1e999}', 'temperature'),
    ('empty body', b'', None),
    ('a bare string', b'"hello"', None),
]


@pytest.mark.parametrize('case,body,param', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_400(live, case, body, param):
  path = '/v1/chat/completions' if b'messages' in body else '/v1/completions'
  assert_openai_error(raw(live, body, path), 400, param)


def test_body_over_the_limit_is_413_before_parsing(live):
  big = b'{"model": "tiny", "prompt": "' + b'a' * MAX_BODY + b'"}'
  assert_openai_error(raw(live, big), 413)

  def chunks():   # no Content-Length: counted as it arrives
    for i in range(0, len(big), 1 << 20):
      yield big[i:i + (1 << 20)]
  assert_openai_error(live.client.post('/v1/completions', content=chunks(), headers=JSON), 413)
  # The server is fine afterwards.
  assert live.client.post('/v1/completions', json={'model': 'tiny', 'prompt': 'x',
                                                   'max_tokens': 2}).status_code == 200


def test_unknown_routes_and_methods_are_openai_errors(live):
  assert_openai_error(live.client.get('/v1/nothing'), 404)
  assert_openai_error(live.client.post('/v2/completions', json={}), 404)
  err = assert_openai_error(live.client.get('/v1/completions'), 405)
  assert 'GET' in err['message']
  assert_openai_error(live.client.delete('/v1/models/tiny'), 405)


def test_unknown_fields_accepted_with_a_warning_or_refused_when_strict(live):
  body = {'model': 'tiny', 'prompt': 'x', 'max_tokens': 2, 'temprature': 0.5,
          'stream_options': None}
  r = live.client.post('/v1/completions', json=body)
  assert r.status_code == 200 and 'temprature' in r.headers['warning']
  strict = TestClient(create_app(live.registry, strict_fields=True))
  err = assert_openai_error(strict.post('/v1/completions', json=body), 400, 'temprature')
  assert 'unknown field' in err['message']
  nested = {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hi', 'x': 1}]}
  assert_openai_error(strict.post('/v1/chat/completions', json=nested), 400, 'messages.x')


def test_client_strings_never_become_metric_labels(live):
  names = [f'model-{i}' for i in range(40)] + ['x' * 5000, 'a"b\\c\n{}', '\u202e\U0001F600',
                                               'tiny:999999999999999999999']
  for n in names:
    r = live.client.post('/v1/completions', json={'model': n, 'prompt': 'x'})
    assert r.status_code == (400 if len(n) > 512 else 404), (n, r.text)
    assert live.client.get(f'/v1/models/{urllib.parse.quote(n[:200])}').status_code == 404
  text = live.client.get('/metrics').text
  samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
  models = {s.labels.get('model') for s in samples} - {None}
  assert models <= {'tiny', 'dec', '', '_other'}, models
  assert any(s.name == 't5like_rejections_total' and s.labels['model'] == '_other'
             and s.value >= len(names) - 1 for s in samples)
  assert len(text) < 200_000


def test_no_filesystem_paths_for_clients(live, base_path):
  root = str(base_path)
  for path in ('/metrics', '/v1/models', '/v1/models/tiny', '/openapi.json', '/health/ready'):
    r = live.client.get(path)
    assert r.status_code == 200 and root not in r.text and '/tmp' not in r.text, path
  schema = live.client.get('/openapi.json').json()
  assert not [p for p in schema['paths'] if p.startswith('/admin')]
  public = {'/v1/completions', '/v1/chat/completions', '/v1/score', '/tokenize'}
  assert public <= set(schema['paths'])
  assert 'CompletionRequest' in schema['components']['schemas']


def test_vllm_metric_names(live):
  app = create_app(live.registry, metrics_names='vllm')
  c = TestClient(app)
  r = c.post('/v1/completions', json={'model': 'dec', 'prompt': [5, 6], 'max_tokens': 3,
                                      'temperature': 0})
  assert r.status_code == 200, r.text
  text = c.get('/metrics').text
  fams = {f.name: f for f in text_string_to_metric_families(text)}
  assert {'vllm:num_requests_running', 'vllm:num_requests_waiting', 'vllm:kv_cache_usage_perc',
          'vllm:prompt_tokens', 'vllm:generation_tokens', 'vllm:time_to_first_token_seconds',
          'vllm:e2e_request_latency_seconds', 'vllm:request_success'} <= set(fams)
  success = [s for s in fams['vllm:request_success'].samples if s.name.endswith('_total')]
  assert success and success[0].labels['model_name'] == 'dec'
  assert success[0].labels['finished_reason'] in ('length', 'stop')
  assert not [f for f in fams if f.startswith('t5like_')]


def test_event_loop_answers_during_large_requests(live):
  """Parsing, validating and tokenising ~6 MB prompts runs in worker threads: /health/live keeps
  answering in under 100 ms (on the loop, each would stall it for 0.2-0.4 s). The prompts are
  mostly whitespace, so they tokenise to a few ids and are served."""
  text = 'To be, or' + ' ' * (MAX_BODY - 2000) + 'not to be'
  body = json.dumps({'model': 'tiny', 'prompt': text, 'max_tokens': 2}).encode()
  results, stop = [], threading.Event()

  def big():
    with httpx.Client(base_url=live.url, timeout=120) as c:
      for _ in range(3):
        results.append(c.post('/v1/completions', content=body, headers=JSON).status_code)
    stop.set()
  t = threading.Thread(target=big)
  t.start()
  worst = 0.0
  with httpx.Client(base_url=live.url, timeout=10) as c:
    c.get('/health/live')
    while not stop.is_set():
      t0 = time.perf_counter()
      assert c.get('/health/live').status_code == 200
      worst = max(worst, time.perf_counter() - t0)
      time.sleep(0.005)
  t.join()
  assert results == [200] * 3
  assert worst < 0.1, worst
