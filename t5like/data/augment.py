"""Text augmentation for the training split: seeded, each operation with its own probability.

Text-level operations (on the raw text of one training chunk, before tokenisation), in this order:
- `reorder_sentences`: sentences are cut into consecutive windows of `reorder_window`; each window
  of two or more sentences is, with probability `reorder_prob`, put in a random non-identity order.
  The multiset of sentences never changes.
- `swap_clauses`: within a sentence, clauses (split after `,` `;` `:`) are paired with their
  neighbour (pair alignment drawn at random) and each pair is swapped with `clause_swap_prob`.
- `swap_words`: the same on words, with `swap_prob`.
- `drop_function_words`: each function word (FUNCTION_WORDS: articles, prepositions, auxiliaries,
  conjunctions, pronouns) is dropped with `drop_function_word_prob`; other words are kept.
Token-level operations (on the ids, before the objective):
- `delete_tokens`: each token is deleted with `delete_prob` (never all of them: if every token is
  drawn the first one stays);
- `mask_tokens`: each remaining token is replaced by `mask_id` (the tokenizer's `<unk>`) with
  `mask_prob`.

Every function takes an explicit `np.random.Generator`: the same seed gives the same output. The
pipeline seeds it per (epoch, example) and never applies it to validation data. Text operations
re-join words with single spaces, which the tokenizer's whitespace normalisation would do anyway.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

FUNCTION_WORDS = frozenset('''
a an the and or but nor so yet for of to in on at by with from into onto upon about as than
is are was were be been being am do does did has have had will would shall should may might
must can could it its i me my you your thou thee thy he him his she her we us our they them
their this that these those which who whom what if then there here not no
'''.split())
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')
_CLAUSE_END = re.compile(r'(?<=[,;:])\s+')


def _check_prob(name: str, p: float) -> None:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'data.{name} must be a probability in [0, 1], got {p}')


def split_sentences(text: str) -> list[str]:
  """Sentences of `text` (cut after . ! ? followed by whitespace), whitespace-collapsed."""
  return [' '.join(s.split()) for s in _SENTENCE_END.split(text) if s.strip()]


def _pair_swap(items: list, rng: np.random.Generator, prob: float) -> list:
  """Pairs (i, i+1) from a random offset 0 or 1; each pair is swapped with `prob`."""
  items = list(items)
  if len(items) < 2 or prob <= 0.0:
    return items
  offset = int(rng.integers(0, 2)) if len(items) > 2 else 0
  starts = np.arange(offset, len(items) - 1, 2)
  swap = rng.random(starts.size) < prob
  for i in starts[swap]:
    items[i], items[i + 1] = items[i + 1], items[i]
  return items


def reorder_sentences(sentences: Sequence[str], rng: np.random.Generator, prob: float,
                      window: int) -> list[str]:
  """Shuffles each window of `window` consecutive sentences with probability `prob`."""
  if window < 1:
    raise ValueError(f'data.reorder_window must be >= 1, got {window}')
  out = list(sentences)
  if prob <= 0.0 or window < 2:
    return out
  for start in range(0, len(out), window):
    chunk = out[start:start + window]
    if len(chunk) < 2 or rng.random() >= prob:
      continue
    perm = np.arange(len(chunk))
    while np.array_equal(perm, np.arange(len(chunk))):
      perm = rng.permutation(len(chunk))
    out[start:start + len(chunk)] = [chunk[i] for i in perm]
  return out


def swap_clauses(sentence: str, rng: np.random.Generator, prob: float) -> str:
  return ' '.join(_pair_swap([c for c in _CLAUSE_END.split(sentence) if c], rng, prob))


def swap_words(words: Sequence[str], rng: np.random.Generator, prob: float) -> list[str]:
  return _pair_swap(list(words), rng, prob)


def is_function_word(word: str) -> bool:
  return word.strip('.,;:!?\'"()[]-').lower() in FUNCTION_WORDS


def drop_function_words(words: Sequence[str], rng: np.random.Generator, prob: float) -> list[str]:
  if prob <= 0.0:
    return list(words)
  draws = rng.random(len(words))
  return [w for w, u in zip(words, draws) if not (u < prob and is_function_word(w))]


def delete_tokens(ids: np.ndarray, rng: np.random.Generator, prob: float) -> np.ndarray:
  ids = np.asarray(ids)
  if prob <= 0.0 or ids.size == 0:
    return ids
  keep = rng.random(ids.size) >= prob
  if not keep.any():
    keep[0] = True
  return ids[keep]


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, prob: float, mask_id: int) -> np.ndarray:
  ids = np.asarray(ids)
  if prob <= 0.0 or ids.size == 0:
    return ids
  return np.where(rng.random(ids.size) < prob, np.asarray(mask_id, ids.dtype), ids)


@dataclasses.dataclass(frozen=True)
class Augmenter:
  """The configured operations; `augment_text` then `augment_tokens` on each training chunk."""
  mask_prob: float = 0.0
  delete_prob: float = 0.0
  reorder_prob: float = 0.0
  reorder_window: int = 3
  swap_prob: float = 0.0
  clause_swap_prob: float = 0.0
  drop_function_word_prob: float = 0.0

  def __post_init__(self):
    for f in ('mask_prob', 'delete_prob', 'reorder_prob', 'swap_prob', 'clause_swap_prob',
              'drop_function_word_prob'):
      _check_prob(f, getattr(self, f))
    if self.reorder_window < 1:
      raise ValueError(f'data.reorder_window must be >= 1, got {self.reorder_window}')

  @classmethod
  def from_config(cls, data_cfg) -> 'Augmenter':
    return cls(**{f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(cls)})

  @property
  def text_active(self) -> bool:
    return (self.reorder_prob > 0 and self.reorder_window > 1) or self.swap_prob > 0 or \
        self.clause_swap_prob > 0 or self.drop_function_word_prob > 0

  @property
  def token_active(self) -> bool:
    return self.mask_prob > 0 or self.delete_prob > 0

  @property
  def active(self) -> bool:
    return self.text_active or self.token_active

  def augment_text(self, text: str, rng: np.random.Generator) -> str:
    if not self.text_active:
      return text
    sentences = reorder_sentences(split_sentences(text), rng, self.reorder_prob,
                                  self.reorder_window)
    if self.clause_swap_prob > 0:
      sentences = [swap_clauses(s, rng, self.clause_swap_prob) for s in sentences]
    words = ' '.join(sentences).split()
    words = swap_words(words, rng, self.swap_prob)
    words = drop_function_words(words, rng, self.drop_function_word_prob)
    return ' '.join(words)

  def augment_tokens(self, ids: np.ndarray, rng: np.random.Generator, mask_id: int) -> np.ndarray:
    ids = delete_tokens(ids, rng, self.delete_prob)
    return mask_tokens(ids, rng, self.mask_prob, mask_id)
