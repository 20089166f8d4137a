"""Streaming plumbing: incremental detokenisation (the deltas add up to the whole decode,
multi-byte characters are never split, stop strings cut where the whole text would) and the
engine-to-loop bridge."""
import asyncio
import threading

import numpy as np
import pytest

from t5like.serve.generation import LoopBridge, TextTracker

TEXTS = ['To be, or not to be, that is the question:',
         'Café — naïve “quotes” and ñ, then 日本語 and an emoji 🙂 at the end.',
         '  leading spaces and\ttabs, newlines\nhere']


def _stream(tok, ids, stop=()):
  tracker = TextTracker(tok, list(stop))
  deltas = []
  for t in ids:
    deltas.append(tracker.add(int(t)))
    if tracker.stopped:
      break
  deltas.append(tracker.flush())
  return tracker, deltas


@pytest.mark.parametrize('text', TEXTS)
def test_deltas_add_up_to_the_whole_decode(serve_tokenizer, text):
  tok = serve_tokenizer
  ids = tok.encode(text)
  assert len(ids) > 8
  tracker, deltas = _stream(tok, ids)
  assert ''.join(deltas) == tok.decode(ids) == tracker.text
  assert not any('\ufffd' in d for d in deltas)   # byte-fallback pieces joined before sending
  assert sum(bool(d) for d in deltas) > len(deltas) // 3   # text flows as it comes, not at the end


def test_random_ids_add_up_to_the_whole_decode(serve_tokenizer):
  tok = serve_tokenizer
  rng = np.random.default_rng(0)
  for _ in range(20):
    ids = rng.integers(2, tok.vocab_size, size=int(rng.integers(1, 40))).tolist()
    _, deltas = _stream(tok, ids)
    assert ''.join(deltas) == tok.decode(ids), ids


def test_streaming_makes_no_sentencepiece_call_per_token(serve_tokenizer, monkeypatch):
  tok = serve_tokenizer
  tok.piece_texts    # built once per tokenizer
  calls = []
  sp_decode = tok._sp.decode
  monkeypatch.setattr(tok._sp, 'decode', lambda *a, **k: calls.append(a) or sp_decode(*a, **k))
  for text in TEXTS:
    ids = tok.encode(text)
    _, deltas = _stream(tok, ids)
    assert ''.join(deltas) == sp_decode(ids)
  assert calls == []


def test_stop_string_cuts_where_the_whole_text_would(serve_tokenizer):
  tok = serve_tokenizer
  ids = tok.encode(TEXTS[0])
  whole = tok.decode(ids)
  tracker, deltas = _stream(tok, ids, stop=['not to'])
  assert tracker.stopped and ''.join(deltas) == whole[:whole.index('not to')]


def test_loop_bridge_runs_calls_in_order_on_the_loop_and_batches_wakeups():
  async def main():
    bridge = LoopBridge.of_running_loop()
    assert LoopBridge.of_running_loop() is bridge
    loop_thread = threading.get_ident()
    got, threads, done, drains = [], set(), asyncio.Event(), [0]
    drain = bridge._drain

    def counted_drain():
      drains[0] += 1
      drain()
    bridge._drain = counted_drain

    def record(i):
      got.append(i)
      threads.add(threading.get_ident())

    def producer():   # the engine thread's side
      for i in range(2000):
        bridge.call(record, i)
      bridge.call(done.set)
    t = threading.Thread(target=producer)
    t.start()
    await asyncio.wait_for(done.wait(), 30)
    t.join()
    assert got == list(range(2000)) and threads == {loop_thread}
    assert 1 <= drains[0] < 1000, drains   # many calls per wake-up
  asyncio.run(main())
