"""End-to-end over real HTTP on loopback: completions, streaming, the openai client, bad input,
429, timeouts, metrics after known traffic, admin auth."""
import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import ADMIN_TOKEN, ENGINE_KW


def post(live, body, **kw):
  return live.client.post('/v1/completions', json=body, **kw)


def sse_events(text):
  lines = [l for l in text.split('\n') if l]
  assert all(l.startswith('data: ') for l in lines), lines
  return [l[len('data: '):] for l in lines]


def scrape(live) -> dict:
  """{(sample name, frozenset(labels)): value} of /metrics."""
  r = live.client.get('/metrics')
  assert r.status_code == 200
  return {(s.name, frozenset(s.labels.items())): s.value
          for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(m, name, **labels):
  return sum(v for (n, lb), v in m.items() if n == name and set(labels.items()) <= lb)


def test_models_and_health(live):
  assert live.client.get('/health/live').json() == {'status': 'alive'}
  r = live.client.get('/health/ready')
  assert r.status_code == 200 and r.json()['ready'] is True
  ids = [m['id'] for m in live.client.get('/v1/models').json()['data']]
  assert ids == ['dec', 'tiny']
  st = live.client.get('/v1/models/tiny').json()
  assert st['model_version_status'] == [{'version': '2', 'state': 'AVAILABLE',
                                         'status': {'error_code': 'OK', 'error_message': ''}}]
  assert live.client.get('/v1/models/nope').status_code == 404


@pytest.mark.parametrize('model', ['tiny', 'dec'])
def test_completion_text_and_ids(live, model, serve_tokenizer):
  body = {'model': model, 'prompt': 'To be, or not to be', 'max_tokens': 6, 'temperature': 0,
          'return_token_ids': True}
  r = post(live, body)
  assert r.status_code == 200, r.text
  out = r.json()
  c = out['choices'][0]
  assert out['object'] == 'text_completion' and c['finish_reason'] in ('length', 'stop')
  want_prompt = serve_tokenizer.encode(body['prompt']) + ([1] if model == 'tiny' else [])
  assert c['prompt_token_ids'] == want_prompt
  assert out['usage'] == {'prompt_tokens': len(want_prompt), 'completion_tokens': len(c['token_ids']),
                          'total_tokens': len(want_prompt) + len(c['token_ids'])}
  assert c['text'] == serve_tokenizer.decode(c['token_ids'])
  if c['finish_reason'] == 'length':
    assert len(c['token_ids']) == 6
  # Greedy is deterministic, and token-id prompts give the same result as the text.
  again = post(live, {**body, 'prompt': want_prompt}).json()['choices'][0]
  assert again['token_ids'] == c['token_ids']


def test_streaming_equals_non_streaming(live):
  body = {'model': 'tiny', 'prompt': [5, 17, 42, 99, 7], 'max_tokens': 8, 'temperature': 0,
          'return_token_ids': True}
  full = post(live, body).json()
  r = post(live, {**body, 'stream': True, 'stream_options': {'include_usage': True}})
  assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
  events = sse_events(r.text)
  assert events[-1] == '[DONE]'
  chunks = [json.loads(e) for e in events[:-1]]
  usage = chunks[-1]
  assert usage['choices'] == [] and usage['usage'] == full['usage']
  text_chunks = chunks[:-1]
  assert ''.join(c['choices'][0]['text'] for c in text_chunks) == full['choices'][0]['text']
  ids = [t for c in text_chunks for t in c['choices'][0]['token_ids']]
  assert ids == full['choices'][0]['token_ids']
  assert text_chunks[-1]['choices'][0]['finish_reason'] == full['choices'][0]['finish_reason']
  assert all(c['choices'][0]['finish_reason'] is None for c in text_chunks[:-1])


def test_sampling_seed_is_reproducible(live):
  body = {'model': 'dec', 'prompt': [9, 8, 7], 'max_tokens': 10, 'temperature': 1.0, 'top_k': 50,
          'top_p': 0.9, 'seed': 1234, 'return_token_ids': True}
  a, b = (post(live, body).json()['choices'][0]['token_ids'] for _ in range(2))
  assert a == b


def test_stop_string_ends_the_text(live, serve_tokenizer):
  body = {'model': 'dec', 'prompt': [20, 30, 40], 'max_tokens': 12, 'temperature': 0,
          'return_token_ids': True}
  full = post(live, body).json()['choices'][0]
  text = full['text']
  if len(text) < 3:
    pytest.skip(f'greedy text {text!r} too short to hold a stop string')
  stop = text[len(text) // 2:len(text) // 2 + 2]
  out = post(live, {**body, 'stop': [stop]}).json()['choices'][0]
  assert out['finish_reason'] == 'stop'
  assert out['text'] == text[:text.find(stop)]
  s = post(live, {**body, 'stop': stop, 'stream': True})
  chunks = [json.loads(e) for e in sse_events(s.text)[:-1]]
  assert ''.join(c['choices'][0]['text'] for c in chunks) == out['text']
  assert chunks[-1]['choices'][0]['finish_reason'] == 'stop'


def test_openai_client(live):
  client = openai.OpenAI(base_url=f'{live.url}/v1', api_key='unused', max_retries=0)
  c = client.completions.create(model='tiny', prompt='Hello there', max_tokens=5, temperature=0)
  assert c.choices[0].finish_reason in ('length', 'stop') and c.usage.completion_tokens <= 5
  streamed = list(client.completions.create(model='tiny', prompt='Hello there', max_tokens=5,
                                            temperature=0, stream=True))
  assert ''.join(s.choices[0].text for s in streamed) == c.choices[0].text
  assert sorted(m.id for m in client.models.list()) == ['dec', 'tiny']
  assert client.models.retrieve('tiny').id == 'tiny'
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model='missing', prompt='x', max_tokens=2)
  with pytest.raises(openai.BadRequestError, match='max_tokens'):
    client.completions.create(model='tiny', prompt='x', max_tokens=ENGINE_KW['max_new_tokens'] + 1)


LONG = list(range(3, 3 + ENGINE_KW['prompt_buckets'][-1] + 1))
BAD = [
    ('not json', b'{"model": "tiny",', 400, None),
    ('not an object', b'[1, 2]', 400, None),
    ('no model', {'prompt': 'x'}, 400, 'model'),
    ('no prompt', {'model': 'tiny'}, 400, 'prompt'),
    ('empty prompt', {'model': 'tiny', 'prompt': ''}, 400, 'prompt'),
    ('max_tokens 0', {'model': 'tiny', 'prompt': 'x', 'max_tokens': 0}, 400, 'max_tokens'),
    ('max_tokens too big', {'model': 'tiny', 'prompt': 'x',
                            'max_tokens': ENGINE_KW['max_new_tokens'] + 1}, 400, 'max_tokens'),
    ('max_tokens string', {'model': 'tiny', 'prompt': 'x', 'max_tokens': '5'}, 400, 'max_tokens'),
    ('temperature < 0', {'model': 'tiny', 'prompt': 'x', 'temperature': -1}, 400, 'temperature'),
    ('top_p 0', {'model': 'tiny', 'prompt': 'x', 'top_p': 0}, 400, 'top_p'),
    ('prompt too long', {'model': 'tiny', 'prompt': LONG}, 400, 'prompt'),
    ('token out of range', {'model': 'tiny', 'prompt': [5, 100000]}, 400, 'prompt'),
    ('echo', {'model': 'tiny', 'prompt': 'x', 'echo': True}, 400, 'echo'),
    ('five stops', {'model': 'tiny', 'prompt': 'x', 'stop': list('abcde')}, 400, 'stop'),
    ('stream not bool', {'model': 'tiny', 'prompt': 'x', 'stream': 'yes'}, 400, 'stream'),
    ('unknown model', {'model': 'nope', 'prompt': 'x'}, 404, 'model'),
    ('unknown version', {'model': 'tiny:9', 'prompt': 'x'}, 404, 'model'),
    ('n too big', {'model': 'tiny', 'prompt': 'x', 'n': 17}, 400, 'n'),
    ('logprobs over 20', {'model': 'tiny', 'prompt': 'x', 'logprobs': 21}, 400, 'logprobs'),
    ('best_of', {'model': 'tiny', 'prompt': 'x', 'best_of': 3}, 400, 'best_of'),
    ('presence_penalty', {'model': 'tiny', 'prompt': 'x', 'presence_penalty': 0.5}, 400,
     'presence_penalty'),
    ('empty batch', {'model': 'tiny', 'prompt': []}, 400, 'prompt'),
    ('batch over 64 prompts', {'model': 'tiny', 'prompt': ['a'] * 65}, 400, 'prompt'),
    ('one prompt of a batch too long', {'model': 'tiny', 'prompt': ['a', LONG]}, 400, 'prompt'),
    ('top_k over int32', {'model': 'tiny', 'prompt': 'x', 'top_k': 2 ** 31}, 400, 'top_k'),
    ('max_tokens over int32', {'model': 'tiny', 'prompt': 'x', 'max_tokens': 2 ** 40}, 400,
     'max_tokens'),
    ('seed over int64', {'model': 'tiny', 'prompt': 'x', 'seed': 2 ** 64}, 400, 'seed'),
    ('token id over int32', {'model': 'tiny', 'prompt': [5, 2 ** 33]}, 400, 'prompt'),
    ('stop id over int32', {'model': 'tiny', 'prompt': 'x', 'stop_token_ids': [2 ** 31]}, 400,
     'stop_token_ids'),
    ('temperature string', {'model': 'tiny', 'prompt': 'x', 'temperature': '0.5'}, 400,
     'temperature'),
    ('bool as int', {'model': 'tiny', 'prompt': 'x', 'max_tokens': True}, 400, 'max_tokens'),
]


@pytest.mark.parametrize('case,body,status,param', BAD, ids=[b[0] for b in BAD])
def test_bad_input(live, case, body, status, param):
  if isinstance(body, bytes):
    r = live.client.post('/v1/completions', content=body,
                         headers={'content-type': 'application/json'})
  else:
    r = post(live, body)
  assert r.status_code == status, r.text
  err = r.json()['error']
  assert err['param'] == param and err['message']
  if case == 'prompt too long':
    assert err['code'] == 'context_length_exceeded' and str(len(LONG)) in err['message']


def test_server_survives_an_internal_error(live, monkeypatch):
  def broken(*a, **k):
    raise RuntimeError('injected failure')
  monkeypatch.setattr(live.registry, 'get', broken)
  r = post(live, {'model': 'tiny', 'prompt': 'x', 'max_tokens': 2})
  assert r.status_code == 500 and 'injected failure' in r.json()['error']['message']
  monkeypatch.undo()
  assert post(live, {'model': 'tiny', 'prompt': 'x', 'max_tokens': 2}).status_code == 200
  assert live.client.get('/health/ready').status_code == 200


def test_full_queue_is_429_with_retry_after(live):
  n = ENGINE_KW['num_slots'] + ENGINE_KW['max_queue'] + 14

  async def go():
    async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
      body = {'model': 'tiny', 'prompt': [5, 6, 7], 'max_tokens': ENGINE_KW['max_new_tokens'],
              'temperature': 0}
      return await asyncio.gather(*(c.post('/v1/completions', json=body) for _ in range(n)))
  rs = asyncio.run(go())
  codes = [r.status_code for r in rs]
  assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
  r429 = next(r for r in rs if r.status_code == 429)
  assert int(r429.headers['retry-after']) >= 1 and r429.json()['error']['code'] == 'queue_full'


def test_timeout(live):
  body = {'model': 'tiny', 'prompt': [5, 6, 7], 'max_tokens': ENGINE_KW['max_new_tokens'],
          'temperature': 0, 'timeout': 0.001}
  r = post(live, body)
  assert r.status_code == 504 and r.json()['error']['code'] == 'timeout'
  s = post(live, {**body, 'stream': True})
  chunks = [json.loads(e) for e in sse_events(s.text)[:-1]]
  assert chunks[-1]['choices'][0]['finish_reason'] == 'timeout'


def test_metrics_after_known_traffic(live):
  before = scrape(live)
  usages = []
  for i in range(3):
    r = post(live, {'model': 'dec', 'prompt': [11, 12, 13, 14 + i], 'max_tokens': 5,
                    'temperature': 0})
    assert r.status_code == 200
    usages.append(r.json()['usage'])
  assert post(live, {'model': 'ghost', 'prompt': 'x'}).status_code == 404
  after = scrape(live)

  def delta(name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)
  mv = dict(model='dec', version='1')
  assert delta('t5like_requests_total', endpoint='/v1/completions', status='200', **mv) == 3
  assert delta('t5like_prompt_tokens_total', **mv) == 12
  assert delta('t5like_generation_tokens_total', **mv) == sum(u['completion_tokens'] for u in usages)
  assert delta('t5like_request_prompt_tokens_sum', **mv) == 12
  for h in ('t5like_time_to_first_token_seconds', 't5like_e2e_request_latency_seconds',
            't5like_request_queue_time_seconds', 't5like_request_generation_tokens',
            't5like_request_prompt_tokens'):
    assert delta(f'{h}_count', **mv) == 3, h
  gen = sum(u['completion_tokens'] for u in usages)
  assert delta('t5like_inter_token_latency_seconds_count', **mv) == gen - 3
  # A name that is not a loaded model is counted under one label, not under its own.
  assert delta('t5like_rejections_total', model='_other', reason='unknown_model') == 1
  assert delta('t5like_requests_total', model='_other', status='404') == 1
  assert not [k for k in after if ('model', 'ghost') in k[1]]
  assert value(after, 't5like_slots', **mv) == ENGINE_KW['num_slots']
  assert value(after, 't5like_requests_running', **mv) == 0
  assert value(after, 't5like_model_state', state='AVAILABLE', **mv) == 1
  assert value(after, 't5like_model_info', arch='decoder', weight_quant='none', **mv) == 1
  assert value(after, 'process_resident_memory_bytes') > 10e6
  assert value(after, 'process_cpu_seconds_total') >= value(before, 'process_cpu_seconds_total') > 0


def test_gauges_are_live_during_a_stream(live):
  body = {'model': 'tiny', 'prompt': [5, 6, 7], 'max_tokens': ENGINE_KW['max_new_tokens'],
          'temperature': 0, 'stream': True}
  seen = []
  with live.client.stream('POST', '/v1/completions', json=body) as r:
    for line in r.iter_lines():
      if line.startswith('data: {') and not seen:
        m = scrape(live)
        seen.append((value(m, 't5like_slots_in_use', model='tiny'),
                     value(m, 't5like_kv_cache_usage_ratio', model='tiny')))
  assert seen and seen[0][0] >= 1 and seen[0][1] > 0
  m = scrape(live)
  assert value(m, 't5like_slots_in_use', model='tiny') == 0


def test_admin_needs_the_token(live):
  r = live.client.post('/admin/models/tiny/load')
  assert r.status_code == 401 and r.headers['www-authenticate'] == 'Bearer'
  r = live.client.post('/admin/models/tiny/load', headers={'Authorization': 'Bearer wrong'})
  assert r.status_code == 401
  ok = {'Authorization': f'Bearer {ADMIN_TOKEN}'}
  assert live.client.post('/admin/models/nope/load', headers=ok).status_code == 404
  assert live.client.post('/admin/models/tiny/load', headers=ok, content=b'{"version": "x"}').status_code == 400
  r = live.client.post('/admin/reload', headers=ok)
  assert r.status_code == 200 and r.json()['models']['tiny'][0]['state'] == 'AVAILABLE'
