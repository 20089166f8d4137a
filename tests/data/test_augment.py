"""Augmentation properties: multisets kept, observed rates match, seeded determinism."""
import collections

import numpy as np
import pytest

from t5like.config import DataConfig
from t5like.data import augment as aug

SENTENCES = [f'Sentence number {i} is here.' for i in range(60)]


def _tol(p, n):
  return 4 * np.sqrt(p * (1 - p) / n) + 1e-9   # 4 standard errors


def test_reordering_keeps_the_multiset_of_sentences_within_windows():
  for seed in range(50):
    out = aug.reorder_sentences(SENTENCES, np.random.default_rng(seed), 0.7, 3)
    assert collections.Counter(out) == collections.Counter(SENTENCES)
    for start in range(0, len(SENTENCES), 3):   # sentences only move within their window
      assert set(out[start:start + 3]) == set(SENTENCES[start:start + 3])
  text = ' '.join(SENTENCES)
  out = aug.Augmenter(reorder_prob=1.0).augment_text(text, np.random.default_rng(0))
  assert out != text and sorted(aug.split_sentences(out)) == sorted(aug.split_sentences(text))


def test_reordering_rate():
  p, w = 0.3, 3
  changed = total = 0
  for seed in range(100):
    out = aug.reorder_sentences(SENTENCES, np.random.default_rng(seed), p, w)
    for s in range(0, len(SENTENCES), w):
      changed += out[s:s + w] != SENTENCES[s:s + w]
      total += 1
  assert abs(changed / total - p) < _tol(p, total)


def test_token_mask_and_delete_rates():
  ids = np.arange(3, 20003)
  masked = aug.mask_tokens(ids, np.random.default_rng(0), 0.15, mask_id=2)
  assert masked.shape == ids.shape
  rate = (masked == 2).mean()
  assert abs(rate - 0.15) < _tol(0.15, ids.size)
  np.testing.assert_array_equal(masked[masked != 2], ids[masked != 2])
  kept = aug.delete_tokens(ids, np.random.default_rng(0), 0.1)
  assert abs(1 - kept.size / ids.size - 0.1) < _tol(0.1, ids.size)
  assert np.all(np.diff(kept) > 0)                 # order kept, only deletions
  assert aug.delete_tokens(np.array([7]), np.random.default_rng(0), 1.0).tolist() == [7]


def test_word_swap_rate_and_multiset():
  words = [f'w{i}' for i in range(4001)]
  out = aug.swap_words(words, np.random.default_rng(0), 0.2)
  assert collections.Counter(out) == collections.Counter(words)
  swapped = sum(1 for i in range(len(words) - 1)
                if out[i] == words[i + 1] and out[i + 1] == words[i])
  pairs = len(words) // 2
  assert abs(swapped / pairs - 0.2) < _tol(0.2, pairs)


def test_clause_swap():
  s = 'First clause, second clause; third clause: fourth clause'
  out = aug.swap_clauses(s, np.random.default_rng(0), 1.0)
  assert out != s and sorted(out.replace(',', '').replace(';', '').replace(':', '').split()) == \
      sorted(s.replace(',', '').replace(';', '').replace(':', '').split())
  assert aug.swap_clauses(s, np.random.default_rng(0), 0.0) == s


def test_function_word_drop_rate_and_only_function_words():
  words = ('the king of denmark is dead and the prince is mad ' * 400).split()
  out = aug.drop_function_words(words, np.random.default_rng(0), 0.4)
  content = [w for w in words if not aug.is_function_word(w)]
  assert [w for w in out if not aug.is_function_word(w)] == content
  n_fw = len(words) - len(content)
  dropped = n_fw - (len(out) - len(content))
  assert abs(dropped / n_fw - 0.4) < _tol(0.4, n_fw)


def test_same_seed_same_output_and_seeds_differ():
  a = aug.Augmenter(mask_prob=0.1, delete_prob=0.1, reorder_prob=0.5, swap_prob=0.1,
                    clause_swap_prob=0.3, drop_function_word_prob=0.2)
  text = ' '.join(SENTENCES)
  ids = np.arange(3, 500)
  out1 = (a.augment_text(text, np.random.default_rng(5)), a.augment_tokens(ids, np.random.default_rng(5), 2))
  out2 = (a.augment_text(text, np.random.default_rng(5)), a.augment_tokens(ids, np.random.default_rng(5), 2))
  out3 = (a.augment_text(text, np.random.default_rng(6)), a.augment_tokens(ids, np.random.default_rng(6), 2))
  assert out1[0] == out2[0] and np.array_equal(out1[1], out2[1])
  assert out1[0] != out3[0] and not np.array_equal(out1[1], out3[1])


def test_inactive_augmenter_is_identity_and_config_mapping():
  a = aug.Augmenter.from_config(DataConfig())
  assert not a.active
  assert a.augment_text('Keep\nme  exactly.', np.random.default_rng(0)) == 'Keep\nme  exactly.'
  b = aug.Augmenter.from_config(DataConfig(swap_prob=0.2, reorder_window=4))
  assert b.text_active and not b.token_active and b.reorder_window == 4
  with pytest.raises(ValueError, match='data.mask_prob'):
    aug.Augmenter(mask_prob=2.0)
