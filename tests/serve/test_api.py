"""The API beyond one completion: batched prompts and n > 1 (checked against single-request
decoding token for token), logprobs, echo, chat (default and bundle templates), scoring,
tokenize / detokenize, and clients that go away."""
import asyncio
import json
import shutil
import time

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from t5like.infer import decode
from t5like.serve import bundle
from t5like.serve.app import create_app
from t5like.serve.registry import ModelRegistry
from tests.serve.conftest import ENGINE_KW, PROMPTS, wait_until
from tests.serve.test_server import post, scrape, sse_events, value


def expected_greedy(base_path, name, version, prompts, n):
  """Single-request decoding (t5like.infer.decode.greedy, one prompt at a time) cut at EOS."""
  b = bundle.load_bundle(str(base_path / name / str(version)))
  out = []
  for p in prompts:
    padded = np.zeros((1, 8), np.int32)   # one shape: one compile
    padded[0, :len(p)] = p
    toks = np.asarray(decode.greedy(b.params, b.cfg, padded, n).tokens)[0].tolist()
    out.append(toks[:toks.index(1)] if 1 in toks else toks)
  return out


@pytest.mark.parametrize('model,version', [('tiny', 2), ('dec', 1)])
def test_batched_prompts_equal_single_request_decoding(live, base_path, model, version):
  prompts = PROMPTS if model == 'tiny' else [p[:-1] for p in PROMPTS]
  want = expected_greedy(base_path, model, version, prompts, 8)
  assert len({tuple(w) for w in want}) == len(want)   # the outputs tell the prompts apart
  r = post(live, {'model': model, 'prompt': prompts, 'max_tokens': 8, 'temperature': 0,
                  'return_token_ids': True})
  assert r.status_code == 200, r.text
  choices = r.json()['choices']
  assert [c['index'] for c in choices] == list(range(len(prompts)))
  assert [c['token_ids'] for c in choices] == want
  assert [c['prompt_token_ids'] for c in choices] == prompts
  assert r.json()['usage']['prompt_tokens'] == sum(map(len, prompts))


def test_n_choices_and_batches(live):
  body = {'model': 'dec', 'prompt': ['To be', 'or not'], 'n': 3, 'max_tokens': 8,
          'temperature': 1.0, 'seed': 11, 'return_token_ids': True}
  out = post(live, body).json()
  choices = out['choices']
  assert [c['index'] for c in choices] == list(range(6))
  first = [tuple(c['token_ids']) for c in choices[:3]]
  assert len(set(first)) > 1                               # n samples, not n copies
  assert out == {**post(live, body).json(), 'id': out['id'], 'created': out['created']}
  assert out['usage']['completion_tokens'] == sum(len(c['token_ids']) for c in choices)
  greedy = post(live, {**body, 'temperature': 0}).json()['choices']
  assert greedy[0]['token_ids'] == greedy[1]['token_ids'] == greedy[2]['token_ids']
  assert greedy[0]['token_ids'] != greedy[3]['token_ids']


def test_streaming_n_choices(live):
  body = {'model': 'tiny', 'prompt': PROMPTS[:2], 'n': 2, 'max_tokens': 6, 'temperature': 0,
          'return_token_ids': True}
  full = post(live, body).json()['choices']
  r = post(live, {**body, 'stream': True})
  chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
  for c in full:
    mine = [ch['choices'][0] for ch in chunks if ch['choices'][0]['index'] == c['index']]
    assert ''.join(m['text'] for m in mine) == c['text']
    assert [t for m in mine for t in m['token_ids']] == c['token_ids']
    assert mine[-1]['finish_reason'] == c['finish_reason']


@pytest.mark.parametrize('model', ['tiny', 'dec'])
def test_logprobs_agree_with_scoring(live, model):
  prompt = PROMPTS[1] if model == 'tiny' else PROMPTS[1][:-1]
  r = post(live, {'model': model, 'prompt': prompt, 'max_tokens': 6, 'temperature': 0,
                  'logprobs': 3, 'return_token_ids': True})
  assert r.status_code == 200, r.text
  c = r.json()['choices'][0]
  lp = c['logprobs']
  n = len(c['token_ids'])
  assert n and len(lp['tokens']) == len(lp['token_logprobs']) == len(lp['top_logprobs']) == n
  for chosen, top in zip(lp['token_logprobs'], lp['top_logprobs']):
    assert 1 <= len(top) <= 3 and chosen <= 0
    assert chosen == pytest.approx(max(top.values()), abs=1e-4)   # greedy takes the best
  assert ''.join(lp['tokens']).startswith(c['text'])
  # /v1/score of the same continuation gives the same per-token log-likelihoods.
  s = live.client.post('/v1/score', json={'model': model, 'input': prompt,
                                          'targets': [c['token_ids'], [7, 8, 9]],
                                          'add_eos': False, 'return_token_logprobs': True})
  assert s.status_code == 200, s.text
  data = s.json()['data']
  np.testing.assert_allclose(data[0]['token_logprobs'], lp['token_logprobs'], atol=2e-3)
  assert data[0]['logprob'] == pytest.approx(sum(lp['token_logprobs']), abs=1e-2)
  # The greedy first token is the likeliest first token.
  assert data[1]['token_logprobs'][0] <= data[0]['token_logprobs'][0]
  assert [d['num_tokens'] for d in data] == [n, 3]


def test_score_text_targets_and_errors(live):
  r = live.client.post('/v1/score', json={'model': 'tiny', 'input': 'To be, or not to be',
                                          'targets': ['that is', 'the question']})
  assert r.status_code == 200, r.text
  data = r.json()['data']
  assert [d['index'] for d in data] == [0, 1] and all(d['logprob'] < 0 for d in data)
  bad = live.client.post('/v1/score', json={'model': 'tiny', 'input': 'x', 'targets': []})
  assert bad.status_code == 400 and bad.json()['error']['param'] == 'targets'
  too_long = live.client.post('/v1/score', json={'model': 'tiny', 'input': 'x',
                                                 'targets': [list(range(3, 300))]})
  assert too_long.status_code == 400 and too_long.json()['error']['param'] == 'targets.0'


def test_echo(live, serve_tokenizer):
  prompt = 'To be, or not'
  r = post(live, {'model': 'dec', 'prompt': prompt, 'echo': True, 'max_tokens': 4,
                  'temperature': 0, 'logprobs': 1})
  assert r.status_code == 200, r.text
  c = r.json()['choices'][0]
  plain = post(live, {'model': 'dec', 'prompt': prompt, 'max_tokens': 4,
                      'temperature': 0}).json()['choices'][0]
  assert c['text'] == prompt + plain['text']
  lp = c['logprobs']
  n_prompt = len(serve_tokenizer.encode(prompt))
  assert lp['token_logprobs'][0] is None and all(x <= 0 for x in lp['token_logprobs'][1:])
  assert len(lp['tokens']) == n_prompt + r.json()['usage']['completion_tokens']
  assert post(live, {'model': 'tiny', 'prompt': 'x', 'echo': True}).status_code == 400


def test_chat_uses_the_default_template(live):
  messages = [{'role': 'system', 'content': 'Hi'},
              {'role': 'user', 'content': [{'type': 'text', 'text': 'Who?'}]}]
  r = live.client.post('/v1/chat/completions', json={'model': 'tiny', 'messages': messages,
                                                     'max_tokens': 6, 'temperature': 0})
  assert r.status_code == 200, r.text
  out = r.json()
  assert out['object'] == 'chat.completion'
  msg = out['choices'][0]['message']
  rendered = 'system: Hi\nuser: Who?\nassistant:'
  same = post(live, {'model': 'tiny', 'prompt': rendered, 'max_tokens': 6,
                     'temperature': 0}).json()
  assert msg == {'role': 'assistant', 'content': same['choices'][0]['text']}
  long = [{'role': 'user', 'content': 'To be, or not to be, that is the question ' * 3}]
  r = live.client.post('/v1/chat/completions', json={'model': 'tiny', 'messages': long})
  assert r.status_code == 400 and r.json()['error']['param'] == 'messages'
  assert out['usage'] == same['usage']
  # Streaming: a role delta first, then content deltas that add up to the same message.
  s = live.client.post('/v1/chat/completions', json={'model': 'tiny', 'messages': messages,
                                                     'max_tokens': 6, 'temperature': 0,
                                                     'stream': True})
  chunks = [json.loads(e) for e in sse_events(s.text)[:-1]]
  assert chunks[0]['choices'][0]['delta']['role'] == 'assistant'
  assert all(c['object'] == 'chat.completion.chunk' for c in chunks)
  assert ''.join(c['choices'][0]['delta'].get('content', '') for c in chunks) == msg['content']
  assert chunks[-1]['choices'][0]['finish_reason'] == out['choices'][0]['finish_reason']


def test_chat_logprobs_n_and_the_openai_client(live):
  client = openai.OpenAI(base_url=f'{live.url}/v1', api_key='unused', max_retries=0)
  c = client.chat.completions.create(model='dec', messages=[{'role': 'user', 'content': 'Hi'}],
                                     max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                     n=2)
  assert len(c.choices) == 2 and c.choices[0].message.content == c.choices[1].message.content
  entries = c.choices[0].logprobs.content
  assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
  assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4) for e in entries)
  streamed = list(client.chat.completions.create(
      model='dec', messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=5, temperature=0,
      stream=True))
  assert ''.join(s.choices[0].delta.content or '' for s in streamed if s.choices) == \
      c.choices[0].message.content
  with pytest.raises(openai.BadRequestError):
    client.chat.completions.create(model='dec', messages=[], max_tokens=2)
  with pytest.raises(openai.BadRequestError):
    client.chat.completions.create(model='dec', messages=[{'role': 'wizard', 'content': 'x'}])


def test_bundle_chat_template_overrides_the_default(tmp_path, base_path):
  shutil.copytree(base_path / 'dec' / '1', tmp_path / 'c' / '1')
  (tmp_path / 'c' / '1' / 'chat_template.jinja').write_text(
      "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
  registry = ModelRegistry(str(tmp_path), engine_kwargs=ENGINE_KW)
  registry.reload()
  try:
    c = TestClient(create_app(registry))
    chat = c.post('/v1/chat/completions', json={'model': 'c', 'messages': [
        {'role': 'user', 'content': 'Hi'}], 'max_tokens': 5, 'temperature': 0})
    plain = c.post('/v1/completions', json={'model': 'c', 'prompt': '<user>Hi', 'max_tokens': 5,
                                            'temperature': 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()['choices'][0]['message']['content'] == plain.json()['choices'][0]['text']
    assert chat.json()['usage']['prompt_tokens'] == plain.json()['usage']['prompt_tokens']
  finally:
    registry.close()


def test_tokenize_detokenize(live, serve_tokenizer):
  r = live.client.post('/tokenize', json={'model': 'tiny', 'prompt': 'To be, or not'})
  ids = serve_tokenizer.encode('To be, or not')
  assert r.json() == {'tokens': ids + [1], 'count': len(ids) + 1,
                      'max_model_len': ENGINE_KW['prompt_buckets'][-1]}
  r = live.client.post('/tokenize', json={'model': 'dec', 'prompt': 'To be, or not'})
  assert r.json()['tokens'] == ids
  r = live.client.post('/detokenize', json={'model': 'dec', 'tokens': ids})
  assert r.json() == {'prompt': 'To be, or not'}
  r = live.client.post('/detokenize', json={'model': 'dec', 'tokens': [5, 10 ** 6]})
  assert r.status_code == 400 and r.json()['error']['param'] == 'tokens'


@pytest.fixture
def slow_engine(live):
  """tiny's engine with every decode step slowed to 40 ms: a request lasts about a second."""
  engine = live.registry.get('tiny').engine
  fast = engine._generate

  def slow(*a, **k):
    time.sleep(0.04)
    return fast(*a, **k)
  engine._generate = slow
  yield engine
  engine._generate = fast


@pytest.mark.parametrize('stream', [False, True])
def test_client_that_goes_away_frees_its_slot(live, slow_engine, stream):
  before = scrape(live)
  body = {'model': 'tiny', 'prompt': [5, 6, 7], 'max_tokens': ENGINE_KW['max_new_tokens'],
          'temperature': 0, 'stream': stream}

  async def go():
    async with httpx.AsyncClient(base_url=live.url, timeout=0.3) as c:
      if stream:   # reads the first token, then hangs up
        async with c.stream('POST', '/v1/completions', json=body) as r:
          async for line in r.aiter_lines():
            if line.startswith('data: {'):
              break
      else:        # gives up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
          await c.post('/v1/completions', json=body)
    assert slow_engine.stats()['running'] == 1   # still generating when the client left
  asyncio.run(go())
  gone = time.monotonic()
  wait_until(lambda: slow_engine.stats()['running'] == 0, timeout=5, every=0.01)
  assert time.monotonic() - gone < 1.0
  wait_until(lambda: value(scrape(live), 't5like_request_finish_total', model='tiny',
                           reason='abort') > value(before, 't5like_request_finish_total',
                                                   model='tiny', reason='abort'), timeout=5)
