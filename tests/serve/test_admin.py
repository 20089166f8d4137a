"""Load / unload / version switch at run time while requests are running; unload frees memory."""
import json
import threading

import jax

from tests.serve.conftest import ADMIN_TOKEN, ENGINE_KW, wait_until

AUTH = {'Authorization': f'Bearer {ADMIN_TOKEN}'}


def states(admin_live, name='tiny'):
  return {s['version']: s['state'] for s in
          admin_live.client.get(f'/v1/models/{name}').json()['model_version_status']}


def stream_in_thread(admin_live, model, out):
  body = {'model': model, 'prompt': [5, 6, 7], 'max_tokens': ENGINE_KW['max_new_tokens'],
          'temperature': 0, 'stream': True, 'stop_token_ids': [1]}
  def run():
    with admin_live.client.stream('POST', '/v1/completions', json=body) as r:
      out['status'] = r.status_code
      out['events'] = [l[6:] for l in r.iter_lines() if l.startswith('data: ')]
  t = threading.Thread(target=run)
  t.start()
  return t


def live_bytes():
  return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def test_version_switch_while_requests_run(admin_live):
  assert states(admin_live) == {'2': 'AVAILABLE'}
  # Pin version 1 too: both serve, the default is the highest.
  r = admin_live.client.post('/admin/models/tiny/load', headers=AUTH, json={'version': 1})
  assert r.status_code == 200, r.text
  assert states(admin_live) == {'2': 'AVAILABLE', '1': 'AVAILABLE'}
  v2_engine = admin_live.registry.get('tiny', 2).engine
  v2_bytes = admin_live.registry.get('tiny', 2).param_bytes
  # A request runs on version 2 while version 2 is unloaded: it drains to its natural end.
  out = {}
  t = stream_in_thread(admin_live, 'tiny', out)
  wait_until(lambda: v2_engine.stats()['running'] >= 1, timeout=60, every=0.001)
  before = live_bytes()
  r = admin_live.client.post('/admin/models/tiny/unload', headers=AUTH, json={'version': 2})
  assert r.status_code == 200
  t.join(60)
  assert out['status'] == 200 and out['events'][-1] == '[DONE]'
  last = json.loads(out['events'][-2])['choices'][0]
  assert last['finish_reason'] in ('length', 'stop')   # not aborted
  assert states(admin_live) == {'2': 'END', '1': 'AVAILABLE'}
  # Its params and KV cache are gone from the device.
  assert v2_engine.params is None
  assert before - live_bytes() >= v2_bytes
  # Traffic now goes to version 1; an explicit version 2 is refused.
  r = admin_live.client.post('/v1/completions',
                             json={'model': 'tiny', 'prompt': 'x', 'max_tokens': 2})
  assert r.status_code == 200
  assert admin_live.client.post('/v1/completions',
                          json={'model': 'tiny:2', 'prompt': 'x', 'max_tokens': 2}).status_code == 503
  # The policy (latest 1) is re-applied: version 2 comes back while a request runs on version 1.
  out = {}
  t = stream_in_thread(admin_live, 'tiny:1', out)
  r = admin_live.client.post('/admin/models/tiny/load', headers=AUTH)
  assert r.status_code == 200
  t.join(60)
  assert out['status'] == 200 and out['events'][-1] == '[DONE]'
  assert states(admin_live) == {'2': 'AVAILABLE', '1': 'AVAILABLE'}   # 1 is still pinned
  r = admin_live.client.post('/admin/models/tiny/unload', headers=AUTH, json={'version': 1})
  assert states(admin_live) == {'2': 'AVAILABLE', '1': 'END'}
  assert admin_live.registry.get('tiny').version == 2


def test_unload_whole_model_then_ready_follows(admin_live):
  r = admin_live.client.post('/admin/models/dec/unload', headers=AUTH)
  assert r.status_code == 200 and states(admin_live, 'dec') == {'1': 'END'}
  assert admin_live.client.post('/v1/completions',
                          json={'model': 'dec', 'prompt': 'x', 'max_tokens': 2}).status_code == 503
  assert [m['id'] for m in admin_live.client.get('/v1/models').json()['data']] == ['tiny']
  admin_live.client.post('/admin/models/tiny/unload', headers=AUTH)
  r = admin_live.client.get('/health/ready')
  assert r.status_code == 503 and not r.json()['ready']
  # Excluded versions stay unloaded across a policy reload, until loaded again.
  admin_live.client.post('/admin/reload', headers=AUTH)
  assert admin_live.client.get('/health/ready').status_code == 503
  assert admin_live.client.post('/admin/models/dec/load', headers=AUTH).status_code == 200
  assert admin_live.client.get('/health/ready').status_code == 200
  assert states(admin_live, 'dec') == {'1': 'AVAILABLE'}
