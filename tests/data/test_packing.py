"""Packing: segments, positions, the decoder shift restarting per example, padding rows."""
import numpy as np
import pytest

from t5like.data import objectives as obj
from t5like.data import packing
from t5like.data.objectives import ObjectiveError


def test_packing_segments_positions_and_shift_restart():
  rng = np.random.default_rng(0)
  examples = [obj.example_features(rng.integers(3, 50, n_in), rng.integers(3, 50, n_t), 'encdec')
              for n_in, n_t in [(5, 3), (4, 2), (9, 6), (2, 3)]]
  rows = packing.pack_examples(examples, {'encoder': 12, 'decoder': 8})
  assert len(rows) == 3   # greedy in order: [ex0, ex1] | [ex2] | [ex3]
  r = rows[0]
  assert r['encoder_segment_ids'].tolist() == [1] * 5 + [2] * 4 + [0] * 3
  assert r['encoder_positions'].tolist() == list(range(5)) + list(range(4)) + [0] * 3
  assert r['decoder_segment_ids'].tolist() == [1] * 3 + [2] * 2 + [0] * 3
  assert r['decoder_positions'].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
  t0, t1 = examples[0]['decoder_target_tokens'], examples[1]['decoder_target_tokens']
  assert r['decoder_input_tokens'].tolist() == [0, t0[0], t0[1], 0, t1[0], 0, 0, 0]
  assert r['decoder_target_tokens'][:5].tolist() == t0.tolist() + t1.tolist()
  assert r['decoder_loss_weights'].tolist() == [1] * 5 + [0] * 3
  assert r['decoder_loss_weights'].dtype == np.float32 and r['encoder_input_tokens'].dtype == np.int32
  for row in rows:  # padding is zero everywhere
    pad = row['encoder_segment_ids'] == 0
    assert not row['encoder_input_tokens'][pad].any() and not row['encoder_positions'][pad].any()
  unpacked = packing.pack_examples(examples, {'encoder': 12, 'decoder': 8}, pack=False)
  assert len(unpacked) == 4 and all(r['encoder_segment_ids'].max() == 1 for r in unpacked)
  batch = packing.stack_rows(rows)
  assert batch['encoder_input_tokens'].shape == (3, 12) and batch['decoder_positions'].shape == (3, 8)


def test_packing_rejects_an_example_longer_than_the_row():
  ex = obj.example_features(np.arange(10), np.arange(3), 'encdec')
  with pytest.raises(ObjectiveError, match='10 encoder tokens, more than the row length 8'):
    packing.pack_examples([ex], {'encoder': 8, 'decoder': 8})


def test_empty_row_has_every_key():
  row = packing.empty_row({'encoder': 4, 'decoder': 3}, 'encdec')
  assert sorted(row) == sorted(obj.ENCDEC_KEYS) and not any(v.any() for v in row.values())
  assert sorted(packing.empty_row({'decoder': 3}, 'decoder')) == sorted(obj.DECODER_KEYS)
