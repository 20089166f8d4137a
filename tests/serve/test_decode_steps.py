"""A server whose engines decode blocks of steps answers exactly as one that decodes a step at a
time: text, token ids, logprobs, finish reasons, stop strings inside a block, n > 1 and streaming."""
import json

import pytest

from tests.serve.conftest import ENGINE_KW, PROMPTS
from tests.serve.test_server import sse_events

MAX = ENGINE_KW['max_new_tokens']


def _complete(server, body):
  r = server.client.post('/v1/completions', json=body)
  assert r.status_code == 200, r.text
  out = r.json()
  return [(c['text'], c['token_ids'], c['finish_reason'], c['logprobs']) for c in out['choices']], \
      out['usage']


def _stream(server, body):
  r = server.client.post('/v1/completions', json={**body, 'stream': True,
                                                   'stream_options': {'include_usage': True}})
  assert r.status_code == 200, r.text
  text, ids, reason, usage = '', [], None, None
  for event in sse_events(r.text):
    if event == '[DONE]':
      continue
    chunk = json.loads(event)
    if chunk.get('usage'):
      usage = chunk['usage']
    for c in chunk['choices']:
      text += c['text']
      ids += c.get('token_ids') or []
      reason = c['finish_reason'] or reason
  return text, ids, reason, usage


@pytest.mark.parametrize('model', ['tiny', 'dec'])
def test_blocks_of_steps_answer_as_single_steps(live, blocks_live, model):
  prompts = [p if model == 'tiny' else p[:-1] for p in PROMPTS]
  texts, stops = [], 0
  for prompt in prompts:
    greedy = {'model': model, 'prompt': prompt, 'max_tokens': MAX, 'temperature': 0,
              'logprobs': 2, 'return_token_ids': True}
    want, usage = _complete(live, greedy)
    assert _complete(blocks_live, greedy) == (want, usage)
    texts.append(want[0][0])
    sampled = {'model': model, 'prompt': prompt, 'max_tokens': 11, 'temperature': 0.9,
               'seed': 5, 'n': 2, 'return_token_ids': True}
    assert _complete(blocks_live, sampled) == _complete(live, sampled)
    # a stop string that ends inside a block of three tokens
    text = want[0][0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
      body = {**greedy, 'stop': [stop], 'logprobs': None}
      got = _stream(blocks_live, body)
      assert got == _stream(live, body)
      assert got[2] == 'stop' and stop not in got[0] and text.startswith(got[0])
      stops += 1
  assert len(set(texts)) == len(prompts), texts
  assert stops >= 2
