"""T5 span corruption, LM objectives and example features."""
import numpy as np
import pytest

from t5like.data import objectives as obj
from t5like.data import packing
from t5like.data.objectives import ObjectiveError

V = 1100  # a tokenizer vocab_size (pieces + 100 sentinels)


def _runs(mask):
  """Lengths of the alternating runs of `mask`, and whether the first run is noise."""
  edges = np.flatnonzero(np.diff(mask.astype(int))) + 1
  return np.diff(np.concatenate([[0], edges, [mask.size]])), bool(mask[0])


def test_random_spans_helper_matches_t5():
  # T5's span-corruption pre-training: inputs 512 -> 568 raw tokens, targets 114.
  assert obj.random_spans_helper(512, 0.15, 3.0) == (568, 114)
  assert obj.random_spans_helper(128, 0.15, 3.0) == (141, 29)


@pytest.mark.parametrize('length,density,mean', [(568, 0.15, 3.0), (100, 0.15, 3.0),
                                                 (32, 0.25, 2.0), (7, 0.3, 2.0)])
def test_noise_mask_counts_and_layout(length, density, mean):
  for seed in range(20):
    mask = obj.random_spans_noise_mask(length, density, np.random.default_rng(seed), mean)
    n_noise = min(max(int(round(length * density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean)), 1)
    runs, first_is_noise = _runs(mask)
    assert mask.shape == (length,) and mask.sum() == n_noise
    assert not first_is_noise                      # spans start with non-noise
    assert len(runs) == 2 * n_spans                # non-noise, noise, ... alternating
  a = obj.random_spans_noise_mask(length, density, np.random.default_rng(1), mean)
  b = obj.random_spans_noise_mask(length, density, np.random.default_rng(1), mean)
  np.testing.assert_array_equal(a, b)


def test_noise_mask_degenerate_lengths():
  assert obj.random_spans_noise_mask(1, 0.15, np.random.default_rng(0)).tolist() == [False]
  assert obj.random_spans_noise_mask(2, 0.15, np.random.default_rng(0)).tolist() == [False, True]
  assert not obj.random_spans_noise_mask(10, 0.0, np.random.default_rng(0)).any()


def test_noise_mask_mean_span_length_statistics():
  rng = np.random.default_rng(0)
  lengths = []
  for _ in range(300):
    runs, _ = _runs(obj.random_spans_noise_mask(568, 0.15, rng, 3.0))
    lengths.extend(runs[1::2])
  assert abs(np.mean(lengths) - 85 / 28) < 1e-9   # round(568*.15)=85 noise tokens in 28 spans


def test_sentinel_replacement_as_in_t5():
  # T5's preprocessors_test: noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel.
  tokens = np.array([10, 11, 12, 13, 14, 15])
  mask = np.array([True, True, False, False, True, False])
  assert obj.noise_span_to_unique_sentinel(tokens, mask, V).tolist() == [V - 1, 12, 13, V - 2, 15]
  assert obj.nonnoise_span_to_unique_sentinel(tokens, mask, V).tolist() == [10, 11, V - 1, 14, V - 2]


def _reconstruct(inputs, targets):
  """Fill each sentinel of inputs with the span that follows it in targets."""
  spans, cur = {}, None
  for t in targets[:-1]:
    if t >= V - 100:
      cur = t
      spans[cur] = []
    else:
      spans[cur].append(t)
  out = []
  for t in inputs[:-1]:
    out.extend(spans[t] if t >= V - 100 else [t])
  return out


def test_span_corruption_round_trip_sentinel_order_and_lengths():
  tokens_length, targets_length = obj.random_spans_helper(128, 0.15, 3.0)
  for seed in range(10):
    ids = np.random.default_rng(100 + seed).integers(3, V - 100, tokens_length)
    inputs, targets = obj.span_corruption(ids, np.random.default_rng(seed), vocab_size=V)
    assert inputs[-1] == 1 and targets[-1] == 1 and inputs.dtype == np.int32
    assert len(inputs) <= 128 and len(targets) <= targets_length
    sentinels_in = [t for t in inputs if t >= V - 100]
    sentinels_out = [t for t in targets if t >= V - 100]
    assert sentinels_in == sentinels_out == list(range(V - 1, V - 1 - len(sentinels_in), -1))
    assert targets[0] == V - 1                     # targets start with <extra_id_0>
    assert _reconstruct(inputs, targets) == ids.tolist()


def test_prefix_lm_split():
  ids = np.arange(3, 103)
  splits = set()
  for seed in range(30):
    inputs, targets = obj.prefix_lm(ids, np.random.default_rng(seed), max_inputs=64, max_targets=64)
    assert inputs[-1] == 1 and targets[-1] == 1
    assert np.concatenate([inputs[:-1], targets[:-1]]).tolist() == ids.tolist()
    assert len(inputs) <= 64 and len(targets) <= 64 and len(inputs) >= 2 and len(targets) >= 2
    splits.add(len(inputs))
  assert len(splits) > 5
  with pytest.raises(ObjectiveError, match='does not fit'):
    obj.prefix_lm(np.arange(200), np.random.default_rng(0), max_inputs=64, max_targets=64)


def test_encdec_and_decoder_features():
  ex = obj.example_features(np.array([5, 6, 1]), np.array([7, 8, 9, 1]), 'encdec')
  assert ex['encoder_input_tokens'].tolist() == [5, 6, 1]
  assert ex['decoder_target_tokens'].tolist() == [7, 8, 9, 1]
  assert ex['decoder_input_tokens'].tolist() == [0, 7, 8, 9]
  assert ex['decoder_loss_weights'].tolist() == [1, 1, 1, 1]
  ex = obj.example_features(np.array([5, 6, 1]), np.array([7, 1]), 'decoder')
  assert ex['decoder_target_tokens'].tolist() == [5, 6, 1, 7, 1]
  assert ex['decoder_input_tokens'].tolist() == [0, 5, 6, 1, 7]
  assert ex['decoder_loss_weights'].tolist() == [0, 0, 0, 1, 1]   # no loss on the prefix
  ex = obj.make_example(np.array([5, 6, 7]), np.random.default_rng(0), objective='causal_lm',
                        arch='decoder', lengths={'decoder': 8}, vocab_size=V)
  assert ex['decoder_target_tokens'].tolist() == [5, 6, 7, 1]
  assert ex['decoder_input_tokens'].tolist() == [0, 5, 6, 7]
  assert ex['decoder_loss_weights'].tolist() == [1, 1, 1, 1]
  with pytest.raises(ObjectiveError, match="causal_lm' needs a decoder-only"):
    obj.make_example(np.array([5]), np.random.default_rng(0), objective='causal_lm', arch='encdec',
                     lengths={'encoder': 8, 'decoder': 8}, vocab_size=V)


@pytest.mark.parametrize('objective,arch,lengths', [
    ('span_corruption', 'encdec', {'encoder': 128, 'decoder': 29}),
    ('span_corruption', 'decoder', {'decoder': 157}),
    ('prefix_lm', 'encdec', {'encoder': 64, 'decoder': 48}),
    ('prefix_lm', 'decoder', {'decoder': 96}),
    ('causal_lm', 'decoder', {'decoder': 64}),
])
def test_full_chunks_fit_their_rows(objective, arch, lengths):
  n = obj.chunk_length(objective, arch, lengths, 0.15, 3.0)
  for seed in range(20):
    ex = obj.make_example(np.arange(3, 3 + n), np.random.default_rng(seed), objective=objective,
                          arch=arch, lengths=lengths, vocab_size=V)
    rows = packing.pack_examples([ex], lengths)   # raises if any feature is too long
    assert len(rows) == 1
