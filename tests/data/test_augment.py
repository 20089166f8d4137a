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


# ----------------------------------------------------------------------------- in the pipelines
# Training batches with augmentation against the same batches without (same seeds, so the same
# examples in the same order): the changes appear at the configured rates.

import json  # noqa: E402

from t5like.data import corpus as corpus_lib  # noqa: E402
from t5like.data import objectives, pipeline, task_pipeline  # noqa: E402
from t5like.data.tasks import Task  # noqa: E402
from t5like.data.tasks.sources import FileSource  # noqa: E402


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_pretraining_batches_are_masked_at_the_configured_rate(tiny_corpus_dir, tiny_tokenizer):
  docs = corpus_lib.load_documents(str(tiny_corpus_dir))
  base = DataConfig(objective='causal_lm', inputs_length=32, batch_size=8)
  lengths = pipeline.sequence_lengths(base, 'decoder')
  n = objectives.chunk_length('causal_lm', 'decoder', lengths, 0.15, 3.0)
  chunks = pipeline.make_chunks(docs, tiny_tokenizer, n)

  def targets(cfg):
    it = pipeline.make_train_iterator(chunks, cfg, 'decoder', tiny_tokenizer, seed=3)
    return np.concatenate([b['decoder_target_tokens'] for b in _batches(it, 6)])

  plain = targets(base)
  assert len(np.unique(plain)) > 50          # the fixture varies
  for p in (0.1, 0.4):
    masked = targets(DataConfig(objective='causal_lm', inputs_length=32, batch_size=8,
                                mask_prob=p))
    real = (plain != 0) & (plain != tiny_tokenizer.eos_id) & (plain != tiny_tokenizer.unk_id)
    changed = masked != plain
    assert np.all(masked[changed] == tiny_tokenizer.unk_id)   # only masking happened
    rate = changed[real].mean()
    assert abs(rate - p) < _tol(p, real.sum()), (p, rate)


@pytest.fixture(scope='module')
def toy_task(tmp_path_factory):
  path = tmp_path_factory.mktemp('task') / 'train.jsonl'
  rows = [{'input': f'the knight of {i} rode to the castle and he was in a hurry. '
                    f'It is {i} miles from the sea.',
           'target': f'knight {i} castle'} for i in range(48)]
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  files = {'train': (str(path),), 'validation': (str(path),)}
  return Task('toy', FileSource(files), prefix='fix: ')


def _task_rows(task, tok, **probs):
  cfg = DataConfig(inputs_length=96, targets_length=16, batch_size=8, pack=False, **probs)
  it, _, _ = task_pipeline.make_task_datasets([(task, 1.0)], cfg, 'encdec', tok, seed=1)
  bs = _batches(it, 6)
  return (np.concatenate([b['encoder_input_tokens'] for b in bs]),
          np.concatenate([b['decoder_target_tokens'] for b in bs]))


def test_task_inputs_are_masked_at_the_configured_rate_targets_untouched(toy_task,
                                                                         tiny_tokenizer):
  enc0, tgt0 = _task_rows(toy_task, tiny_tokenizer)
  assert len({tuple(r) for r in enc0}) > 20   # the fixture varies
  p = 0.3
  enc, tgt = _task_rows(toy_task, tiny_tokenizer, mask_prob=p)
  np.testing.assert_array_equal(tgt, tgt0)
  real = enc0 > 1
  changed = enc != enc0
  assert np.all(enc[changed] == tiny_tokenizer.unk_id)
  rate = changed[real].mean()
  assert abs(rate - p) < _tol(p, real.sum()), rate


def test_task_inputs_reordered_and_perturbed_prefix_and_targets_kept(toy_task, tiny_tokenizer):
  enc0, tgt0 = _task_rows(toy_task, tiny_tokenizer)
  dec = lambda rows: [tiny_tokenizer.decode([int(t) for t in r if t > 1]) for r in rows]
  plain = dec(enc0)
  p = 0.5
  enc, tgt = _task_rows(toy_task, tiny_tokenizer, drop_function_word_prob=p)
  np.testing.assert_array_equal(tgt, tgt0)
  text = dec(enc)
  assert all(t.startswith('fix: ') for t in text)
  fw = lambda s: sum(aug.is_function_word(w) for w in s.split()[1:])
  before, after = sum(fw(s) for s in plain), sum(fw(s) for s in text)
  assert abs((before - after) / before - p) < _tol(p, before), (before, after)
  # Sentence reordering (two sentences a row, window 2): swapped in about reorder_prob of rows.
  enc, tgt = _task_rows(toy_task, tiny_tokenizer, reorder_prob=p, reorder_window=2)
  np.testing.assert_array_equal(tgt, tgt0)
  swapped = [t != s for t, s in zip(dec(enc), plain)]
  for t, s in zip(dec(enc), plain):
    assert sorted(t[5:].split()) == sorted(s[5:].split())   # the same words, the prefix kept
  assert abs(np.mean(swapped) - p) < _tol(p, len(swapped)), np.mean(swapped)
