"""Pre-training objectives, in pure numpy with explicit `np.random.Generator`s.

Written here because no TensorFlow-free library provides them: `random_spans_helper`,
`random_spans_noise_mask`, `noise_span_to_unique_sentinel` and `nonnoise_span_to_unique_sentinel`
follow T5's `t5/data/preprocessors.py` (and seqio's, with `random_roll=False`) step by step, so the
same lengths give the same number and layout of spans; only the random stream differs (numpy
instead of TF stateless ops).

Objectives turn one chunk of token ids (no EOS) into one *example*, a dict of 1-d int arrays:
- `span_corruption`: T5's. Spans of noise tokens (density 0.15, mean length 3) are replaced in the
  inputs by sentinels, `<extra_id_0>` (the highest id) for the first span, then decreasing; the
  targets hold each sentinel followed by the span it replaced. Both end with EOS.
- `prefix_lm`: the chunk is split at a uniformly random point; inputs = prefix + EOS, targets =
  rest + EOS.
- `causal_lm` (decoder-only): targets = chunk + EOS.

`example_features(inputs, targets, arch)` gives the model features of one example, with the T5X
names that are the contract with the trainer:
- 'encdec': encoder_input_tokens = inputs; decoder_target_tokens = targets; decoder_input_tokens =
  targets shifted right with start id 0; decoder_loss_weights = 1.
- 'decoder': one stream inputs + targets: decoder_target_tokens = stream, decoder_input_tokens =
  stream shifted right with 0; decoder_loss_weights = 0 on the inputs (the prefix), 1 on targets.

Because the shift right is done per example, decoder_input_tokens restarts with 0 in every segment
once `t5like.data.packing` puts examples side by side into rows.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from t5like.config import ARCHS, OBJECTIVES

ENCDEC_KEYS = ('encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions',
               'decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids',
               'decoder_positions', 'decoder_loss_weights')
DECODER_KEYS = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids',
                'decoder_positions', 'decoder_loss_weights')
DECODER_START_ID = 0


class ObjectiveError(ValueError):
  """An objective or packing setting (or an example) is invalid; the message names it."""


# ----------------------------------------------------------------------------- T5 span corruption

def random_spans_helper(inputs_length: int, noise_density: float, mean_noise_span_length: float,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
  """(tokens_length, targets_length): the longest raw chunk whose corrupted inputs (with EOS) fit
  in `inputs_length`, and the length its targets (with EOS) then take. T5's function."""

  def lengths(tokens_length):
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return (num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
            num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)

  if inputs_length < 2:
    raise ObjectiveError(f'data.inputs_length={inputs_length} is too short for span corruption')
  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = lengths(tokens_length)
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Random partition of `num_items` into `num_segments` non-empty segments: their lengths."""
  first_in_segment = np.pad(rng.permutation((np.arange(num_items - 1) < num_segments - 1)
                                            .astype(np.int32)), [[1, 0]])
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments).astype(np.int32)


def random_spans_noise_mask(length: int, noise_density: float, rng: np.random.Generator,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
  """Boolean mask [length] of random noise spans, as T5 computes it.

  num_noise_tokens = round(length * noise_density) (clipped to [1, length - 1]),
  num_noise_spans = round(num_noise_tokens / mean_noise_span_length) (at least 1); spans alternate
  non-noise, noise, starting with non-noise; all such masks are equally likely.
  """
  if noise_density == 0.0:
    return np.zeros(length, dtype=bool)
  orig_length = length
  length = max(length, 2)
  num_noise_tokens = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
  num_noise_spans = max(int(np.round(np.float32(num_noise_tokens) /
                                     np.float32(mean_noise_span_length))), 1)
  num_nonnoise_tokens = length - num_noise_tokens
  noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
  nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans, rng)
  interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  span_start_indicator = np.zeros(length, dtype=np.int32)
  span_start_indicator[span_starts] = 1
  span_num = np.cumsum(span_start_indicator)
  is_noise = span_num % 2 == 1
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  vocab_size: int) -> np.ndarray:
  """Each noise span -> one sentinel (vocab_size - 1 for the first, then decreasing)."""
  prev_token_is_noise = np.pad(noise_mask[:-1], [[1, 0]])
  first_noise_tokens = noise_mask & ~prev_token_is_noise
  subsequent_noise_tokens = noise_mask & prev_token_is_noise
  sentinel = vocab_size - np.cumsum(first_noise_tokens)
  tokens = np.where(first_noise_tokens, sentinel, tokens)
  return tokens[~subsequent_noise_tokens]


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     vocab_size: int) -> np.ndarray:
  return noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size)


def span_corruption(ids: np.ndarray, rng: np.random.Generator, *, vocab_size: int, eos_id: int = 1,
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of T5 span corruption on `ids` (no EOS); both end with EOS.

  `vocab_size` is the tokenizer's (SentencePiece pieces + sentinels): the first span's sentinel
  is `vocab_size - 1` = `<extra_id_0>`.
  """
  ids = np.asarray(ids, dtype=np.int32)
  if ids.size == 0:
    raise ObjectiveError('span corruption needs at least one token, got an empty example')
  mask = random_spans_noise_mask(ids.size, noise_density, rng, mean_noise_span_length)
  inputs = noise_span_to_unique_sentinel(ids, mask, vocab_size)
  targets = nonnoise_span_to_unique_sentinel(ids, mask, vocab_size)
  eos = np.array([eos_id], np.int32)
  return np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32)


# ----------------------------------------------------------------------------- LM objectives

def prefix_lm(ids: np.ndarray, rng: np.random.Generator, *, max_inputs: int, max_targets: int,
              eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(prefix + EOS, rest + EOS), split at a uniform point among those where both fit their
  lengths (both parts non-empty when the chunk has 2 or more tokens)."""
  ids = np.asarray(ids, dtype=np.int32)
  n = ids.size
  if n + 2 > max_inputs + max_targets:
    raise ObjectiveError(f'prefix_lm example of {n} tokens does not fit inputs {max_inputs} + '
                         f'targets {max_targets} (each with EOS)')
  lo = max(1 if n >= 2 else 0, n - (max_targets - 1))
  hi = min(n - 1 if n >= 2 else 0, max_inputs - 1)
  split = int(rng.integers(lo, hi + 1)) if hi > lo else lo
  eos = np.array([eos_id], np.int32)
  return np.concatenate([ids[:split], eos]), np.concatenate([ids[split:], eos])


def causal_lm(ids: np.ndarray, *, eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(empty inputs, chunk + EOS)."""
  ids = np.asarray(ids, dtype=np.int32)
  return np.zeros(0, np.int32), np.concatenate([ids, np.array([eos_id], np.int32)])


def chunk_length(objective: str, arch: str, lengths: Mapping[str, int], noise_density: float,
                 mean_noise_span_length: float) -> int:
  """The most raw tokens (no EOS) one example may hold so its features fit `lengths`."""
  if objective == 'span_corruption':
    if arch == 'encdec':
      return random_spans_helper(lengths['encoder'], noise_density, mean_noise_span_length)[0]
    # Decoder-only: inputs and targets share the stream; find the longest chunk that fits.
    n = 1
    while sum(_span_lengths(n + 1, noise_density, mean_noise_span_length)) <= lengths['decoder']:
      n += 1
    return n
  if objective == 'prefix_lm':
    if arch == 'encdec':  # any split point keeps prefix + EOS and rest + EOS within their lengths
      return min(lengths['encoder'], lengths['decoder'])
    return lengths['decoder'] - 2
  return lengths['decoder'] - 1


def _span_lengths(n, noise_density, mean_noise_span_length):
  length = max(n, 2)
  noise = min(max(int(round(length * noise_density)), 1), length - 1)
  spans = max(int(round(noise / mean_noise_span_length)), 1)
  return n - noise + spans + 1, noise + spans + 1


def make_example(ids: np.ndarray, rng: np.random.Generator, *, objective: str, arch: str,
                 lengths: Mapping[str, int], vocab_size: int, eos_id: int = 1,
                 noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> dict[str, np.ndarray]:
  """The model features of one chunk of ids under `objective` for `arch`."""
  if objective == 'span_corruption':
    inputs, targets = span_corruption(ids, rng, vocab_size=vocab_size, eos_id=eos_id,
                                      noise_density=noise_density,
                                      mean_noise_span_length=mean_noise_span_length)
  elif objective == 'prefix_lm':
    if arch == 'encdec':
      mi, mt = lengths['encoder'], lengths['decoder']
    else:  # one stream: any split of a chunk of at most decoder - 2 tokens fits
      mi = mt = lengths['decoder'] - 1
    inputs, targets = prefix_lm(ids, rng, max_inputs=mi, max_targets=mt, eos_id=eos_id)
  elif objective == 'causal_lm':
    if arch != 'decoder':
      raise ObjectiveError("data.objective='causal_lm' needs a decoder-only model (arch "
                           "'decoder'); for 'encdec' use 'span_corruption' or 'prefix_lm'")
    inputs, targets = causal_lm(ids, eos_id=eos_id)
  else:
    raise ObjectiveError(f'data.objective={objective!r} is not valid; choose one of '
                         f'{list(OBJECTIVES)}')
  return example_features(inputs, targets, arch)


def shift_right(x: np.ndarray, start_id: int = DECODER_START_ID) -> np.ndarray:
  return np.concatenate([np.array([start_id], x.dtype), x[:-1]]) if x.size else x


def example_features(inputs: np.ndarray, targets: np.ndarray, arch: str) -> dict[str, np.ndarray]:
  """The unpacked, unpadded features of one example (see the module docstring)."""
  inputs = np.asarray(inputs, np.int32)
  targets = np.asarray(targets, np.int32)
  if arch == 'encdec':
    return {'encoder_input_tokens': inputs,
            'decoder_target_tokens': targets,
            'decoder_input_tokens': shift_right(targets),
            'decoder_loss_weights': np.ones(targets.size, np.float32)}
  if arch == 'decoder':
    stream = np.concatenate([inputs, targets])
    weights = np.concatenate([np.zeros(inputs.size, np.float32), np.ones(targets.size, np.float32)])
    return {'decoder_target_tokens': stream,
            'decoder_input_tokens': shift_right(stream),
            'decoder_loss_weights': weights}
  raise ObjectiveError(f'model arch {arch!r} is not valid; choose one of {list(ARCHS)}')
