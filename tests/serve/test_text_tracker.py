"""Incremental detokenisation: the streamed deltas add up to the whole decode, multi-byte
characters are never split, stop strings cut where the whole text would."""
import numpy as np
import pytest

from t5like.serve.generation import TextTracker

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


def test_stop_string_cuts_where_the_whole_text_would(serve_tokenizer):
  tok = serve_tokenizer
  ids = tok.encode(TEXTS[0])
  whole = tok.decode(ids)
  tracker, deltas = _stream(tok, ids, stop=['not to'])
  assert tracker.stopped and ''.join(deltas) == whole[:whole.index('not to')]
