"""The continuous-batching engine: equal to decode.greedy per request (on weights whose greedy
outputs differ between prompts), no head-of-line blocking, slot reuse, cancel / timeout, idle
slots that do not keep their last request's sampling, logprobs, scoring, bad input, shutdown and
freeing memory."""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.infer import decode, sampling
from t5like.infer.engine import (Engine, EngineError, QueueFull, Request, RequestTooLong,
                                 SamplingParams)
from t5like.models.random_weights import random_params

# Prefill batches of 2 with 3 slots: bursts are prefilled both batched and alone.
KW = dict(num_slots=3, prompt_buckets=(8, 16), max_new_tokens=12, max_queue=16,
          prefill_batch_sizes=(2,))


class Collector:
  def __init__(self):
    self.tokens, self.reason = [], None
    self.done = threading.Event()

  def __call__(self, kind, value):
    if kind == 'tokens':
      assert value, 'an empty tokens event'
      self.tokens.extend(value)
    else:
      self.reason = value
      self.done.set()


def request(prompt, max_tokens=KW['max_new_tokens'], **kw):
  c = Collector()
  timeout = kw.pop('timeout_s', None)
  return Request(list(prompt), SamplingParams(max_tokens=max_tokens, temperature=kw.pop('temperature', 0.0), **kw),
                 c, timeout_s=timeout), c


# (variant, decode steps per device call, overlap): blocks of 3 steps end mid-block at max_tokens
# 5 and 8 and at stop tokens.
@pytest.fixture(scope='module', params=[('t5_tiny', 1, True), ('t5_tiny', 3, False),
                                        ('decoder_tiny', 1, False), ('decoder_tiny', 3, True)],
                ids=lambda p: f'{p[0]}-steps{p[1]}-{"overlap" if p[2] else "serial"}')
def model(request):
  variant, steps, overlap = request.param
  cfg = get_variant(variant)
  # Not init's weights: a fresh tiny T5 greedy-decodes one token for every prompt, which would
  # hide a slot mix-up or a wrong cross-attention row.
  params = random_params(cfg, seed=3, embed_std=0.3, std=0.2)
  firsts = {tuple(greedy_alone(params, cfg, p)[:4]) for p in PROMPTS}
  assert len(firsts) == len(PROMPTS), firsts
  engine = Engine(params, cfg, name=variant, decode_steps=steps, overlap=overlap, **KW)
  engine.start()
  yield params, cfg, engine
  engine.close()


PROMPTS = [[5, 6, 7], [9, 3, 4, 10, 11, 12, 13, 14, 15, 40], [100, 200], [7] * 5, [42, 43, 44, 45],
           [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312], [17]]


def greedy_alone(params, cfg, prompt, n=KW['max_new_tokens']):
  """decode.greedy of one prompt, cut at EOS."""
  padded = np.zeros((1, 16), np.int32)
  padded[0, :len(prompt)] = prompt
  out = decode.greedy(params, cfg, padded, n)
  want = [int(t) for t in np.asarray(out.tokens[0, :int(out.lengths[0])])]
  return want[:want.index(cfg.eos_id)] if cfg.eos_id in want else want


def test_concurrent_greedy_equals_greedy_alone(model):
  params, cfg, engine = model
  reqs = [request(p, max_tokens=m) for p, m in zip(PROMPTS, [12, 5, 12, 3, 12, 8, 12])]
  for r, _ in reqs:   # 7 requests for 3 slots: slots are reused while others run
    engine.submit(r)
  for r, c in reqs:
    assert c.done.wait(120), r.id
  for (r, c), prompt in zip(reqs, PROMPTS):
    want = greedy_alone(params, cfg, prompt)
    if len(want) < KW['max_new_tokens']:   # it met EOS
      assert c.reason == 'stop' or len(c.tokens) == r.params.max_tokens
    assert c.tokens == want[:r.params.max_tokens], (prompt, c.reason)
    assert c.reason in ('stop', 'length') and r.output_ids == c.tokens
    assert r.submitted_at <= r.started_at <= r.first_token_at <= r.finished_at
  s = engine.stats()
  assert s['running'] == 0 and s['waiting'] == 0 and s['slots_in_use'] == 0


def test_a_first_token_that_stops_frees_its_slot(model):
  """The first token comes from the prefill, taken after the next block is already dispatched:
  a request that stops on it ends with no tokens, its row's extra steps are dropped, and its slot
  serves the next request as if fresh."""
  params, cfg, engine = model
  first = greedy_alone(params, cfg, PROMPTS[0])[0]
  others = [request(p) for p in PROMPTS[1:3]]
  stopped, c_stop = request(PROMPTS[0], stop_token_ids=(first,))
  after = [request(p) for p in (PROMPTS[0], PROMPTS[3])]
  for r, _ in [others[0], (stopped, c_stop), others[1], *after]:
    engine.submit(r)
  for r, c in [*others, (stopped, c_stop), *after]:
    assert c.done.wait(120), r.id
  assert (c_stop.tokens, c_stop.reason, stopped.output_ids) == ([], 'stop', [])
  for (r, c), prompt in zip([*others, *after], [*PROMPTS[1:3], PROMPTS[0], PROMPTS[3]]):
    assert c.tokens == greedy_alone(params, cfg, prompt), prompt
  assert engine.stats()['slots_in_use'] == 0


def test_a_burst_is_prefilled_in_batches_and_decodes_as_alone(model):
  params, cfg, _ = model
  params = jax.tree.map(lambda x: x + 0, params)   # its own copy: close() deletes it
  engine = Engine(params, cfg, name='burst', decode_steps=model[2].decode_steps,
                  overlap=model[2].overlap,
                  **{**KW, 'num_slots': 6,
                                               'prefill_batch_sizes': (1, 4, 16)})
  assert engine.prefill_sizes == (1, 4)
  prompts = [p for p in PROMPTS if len(p) <= 8][:5] + [PROMPTS[1]]   # 5 in bucket 8, 1 in 16
  reqs = [request(p, max_tokens=6) for p in prompts]
  for r, _ in reqs:   # all waiting before the device loop starts: admitted in one go
    engine.submit(r)
  engine.start()
  try:
    for (r, c), prompt in zip(reqs, prompts):
      assert c.done.wait(120), r.id
      assert c.tokens == greedy_alone(params, cfg, prompt)[:6], prompt
    s = engine.stats()
    # bucket 8: a batch of 4 and one alone; bucket 16: one alone
    assert (s['prefill_calls'], s['prefilled']) == (3, 6), s
  finally:
    engine.close()


def test_blocks_of_steps_equal_single_steps(model):
  """Seeded sampling, logprobs and stop tokens give the same results whatever the decode steps
  per device call (each step's key depends on the row's position alone), with or without
  overlap."""
  params, cfg, engine = model
  params = jax.tree.map(lambda x: x + 0, params)   # its own copy: close() deletes it
  other = Engine(params, cfg, name='other', decode_steps=1 if engine.decode_steps > 1 else 2,
                 overlap=not engine.overlap, **KW)
  other.start()
  try:
    results = []
    for e in (engine, other):
      greedy = greedy_alone(params, cfg, PROMPTS[1])
      reqs = [request(p, max_tokens=m, temperature=0.9, top_k=20, seed=i, logprobs=2)
              for i, (p, m) in enumerate(zip(PROMPTS, [12, 7, 5, 12, 8, 11, 4]))]
      # a stop id met mid-block: the greedy output's third token
      reqs.append(request(PROMPTS[1], stop_token_ids=(greedy[2],), logprobs=1))
      for r, _ in reqs:
        e.submit(r)
      for r, c in reqs:
        assert c.done.wait(120), r.id
      results.append([(c.tokens, c.reason, r.logprobs) for r, c in reqs])
      assert results[-1][-1][:2] == (greedy[:2], 'stop')
    for (toks, reason, lps), (toks1, reason1, lps1) in zip(*results):
      assert (toks, reason) == (toks1, reason1)
      np.testing.assert_allclose([x[0] for x in lps], [x[0] for x in lps1], atol=1e-5)
      assert [x[1] for x in lps] == [x[1] for x in lps1]
    assert len({tuple(t) for t, _, _ in results[0]}) > 4     # the outputs differ
  finally:
    other.close()


def test_long_request_does_not_block_short_ones(model):
  _, cfg, engine = model
  stop = cfg.vocab_size + 5    # out-of-vocab stop id: never matched
  long, lc = request([5, 6, 7], max_tokens=KW['max_new_tokens'])
  engine.submit(long)
  shorts = [request([8, 9], max_tokens=1) for _ in range(4)]
  for r, _ in shorts:
    engine.submit(r)
  for r, c in shorts:
    assert c.done.wait(60)
  assert lc.done.wait(60)
  finished = sorted([long] + [r for r, _ in shorts], key=lambda r: r.finished_at)
  if lc.reason == 'length':   # it ran its 12 tokens: the 1-token requests overtook it
    assert finished[-1] is long
  assert all(c.reason in ('length', 'stop') for _, c in shorts) and stop > 0


def test_cancel_timeout_and_queued_cancel(model):
  _, _, engine = model
  running = [request([5, 6, 7]) for _ in range(KW['num_slots'])]
  for r, _ in running:
    engine.submit(r)
  queued, qc = request([8, 9])
  engine.submit(queued)
  engine.cancel(queued)
  assert qc.done.wait(30) and qc.reason == 'abort'
  assert queued.started_at is None and qc.tokens == []
  engine.cancel(running[0][0])
  assert running[0][1].done.wait(30) and running[0][1].reason in ('abort', 'stop', 'length')
  for r, c in running[1:]:
    c.done.wait(60)
  timed, tc = request([5, 6, 7], timeout_s=1e-4)
  engine.submit(timed)
  assert tc.done.wait(30) and tc.reason == 'timeout'


def test_broken_consumer_does_not_stop_the_engine(model):
  _, _, engine = model
  def boom(kind, value):
    raise RuntimeError('consumer failed')
  bad = Request([5, 6], SamplingParams(max_tokens=4, temperature=0.0), boom)
  engine.submit(bad)
  ok, c = request([5, 6], max_tokens=4)
  engine.submit(ok)
  assert c.done.wait(60) and c.reason in ('length', 'stop')
  assert engine.alive


def test_seeded_sampling_is_reproducible(model):
  _, _, engine = model
  outs = []
  for _ in range(2):
    r, c = request([5, 6, 7], max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    engine.submit(r)
    assert c.done.wait(60)
    outs.append(c.tokens)
  assert outs[0] == outs[1]


def test_idle_slots_forget_their_sampling(model):
  """A finished sampled request leaves its slot greedy: the sampler's path (and speed) depends on
  the live rows only, and greedy results after sampled traffic equal those before."""
  params, cfg, engine = model
  assert not engine._temp.any()                      # warm-up leaves nothing behind either
  sampled = [request(p, max_tokens=6, temperature=0.9, top_k=20, top_p=0.8, seed=i)
             for i, p in enumerate(PROMPTS[:KW['num_slots']])]
  for r, _ in sampled:
    engine.submit(r)
  for _, c in sampled:
    assert c.done.wait(60)
  assert not engine._temp.any() and not engine._top_k.any() and (engine._top_p == 1).all()
  r, c = request(PROMPTS[0])
  engine.submit(r)
  assert c.done.wait(60) and c.tokens == greedy_alone(params, cfg, PROMPTS[0])


def test_logprobs_and_score(model):
  params, cfg, engine = model
  prompt = PROMPTS[1]
  r, c = request(prompt, max_tokens=6, logprobs=4)
  engine.submit(r)
  assert c.done.wait(60)
  assert len(r.logprobs) == len(c.tokens) > 0
  for tok, (lp, ids, top) in zip(c.tokens, r.logprobs):
    assert ids[0] == tok and len(ids) == len(top) == 4       # greedy: the chosen is the best
    assert lp == pytest.approx(top[0]) and top == sorted(top, reverse=True) and lp <= 0
  # Teacher-forced scoring of the same tokens gives the same log-probabilities.
  np.testing.assert_allclose(engine.score(prompt, c.tokens), [x[0] for x in r.logprobs],
                             atol=2e-3)
  other = engine.score(prompt, [7, 8, 9])
  assert other.shape == (3,) and other[0] <= r.logprobs[0][0] + 1e-5
  with pytest.raises(ValueError, match='non-empty'):
    engine.score(prompt, [])
  with pytest.raises(RequestTooLong):
    engine.score(prompt, [5] * (KW['prompt_buckets'][-1] + KW['max_new_tokens'] + 1))


def test_bad_input(model):
  _, cfg, engine = model
  sp = SamplingParams(max_tokens=4)
  with pytest.raises(ValueError, match='empty'):
    engine.submit(Request([], sp, Collector()))
  with pytest.raises(RequestTooLong, match='17 tokens.*16'):
    engine.submit(Request([5] * 17, sp, Collector()))
  with pytest.raises(ValueError, match='out of range'):
    engine.submit(Request([5, cfg.vocab_size], sp, Collector()))
  for m in (0, KW['max_new_tokens'] + 1):
    with pytest.raises(ValueError, match='max_tokens'):
      engine.submit(Request([5], SamplingParams(max_tokens=m), Collector()))
  with pytest.raises(ValueError, match='top_p'):
    engine.submit(Request([5], SamplingParams(max_tokens=4, top_p=0.0), Collector()))
  with pytest.raises(ValueError, match='positive'):
    Engine(None, cfg, num_slots=0)


def test_queue_full_shutdown_and_close(model):
  params, cfg, _ = model
  params = jax.tree.map(lambda x: x + 0, params)   # its own copy: close() deletes it
  engine = Engine(params, cfg, name='second', **{**KW, 'max_queue': 2})
  reqs = [request([5, 6, 7]) for _ in range(2)]
  for r, _ in reqs:
    engine.submit(r)          # not started yet: they wait
  with pytest.raises(QueueFull, match='2 waiting'):
    engine.submit(request([5])[0])
  engine.start()              # shares the first engine's compiled steps
  time.sleep(0.05)
  engine.shutdown(drain_timeout_s=0.0)
  for r, c in reqs:
    assert c.done.wait(10) and c.reason in ('abort', 'length', 'stop')
  with pytest.raises(EngineError, match='shutting down'):
    engine.submit(request([5])[0])
  held = jax.tree.leaves((engine.params, engine._cache))   # params in the decoding layout
  engine.close()
  assert all(x.is_deleted() for x in held) and engine.params is None
  # Weights the decoding layout leaves alone are shared with the given tree, and freed with it.
  assert params['decoder']['final_norm']['scale'].is_deleted()


def test_sampler_draws_from_the_distribution():
  """The inverse-CDF draw the engine's sampler uses: frequencies follow softmax(logits / T), a
  removed (filtered) entry is never drawn, and both paths match for the same keys."""
  probs = np.asarray([0.5, 0.3, 0.15, 0.05, 0.0], np.float32)
  logits = jnp.log(jnp.asarray(np.tile(probs, (8192, 1))))
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), 8192))
  toks = np.asarray(sampling.sample(logits, keys, 1.0))
  freq = np.bincount(toks, minlength=5) / len(toks)
  np.testing.assert_allclose(freq, probs, atol=0.02)
  assert freq[4] == 0
  filtered = np.asarray(sampling.sample(logits, keys, 1.0, top_k=2))
  assert set(filtered.tolist()) == {0, 1}
  # Temperature only and a filter that keeps everything take different paths, same draws.
  np.testing.assert_array_equal(np.asarray(sampling.sample(logits, keys, 0.7)),
                                np.asarray(sampling.sample(logits, keys, 0.7, top_k=5)))
