"""Packing: examples side by side in fixed-length rows, with segment ids and positions.

`Packer` / `pack_examples` fill one row at a time, in order: an example that does not fit starts
the next row. Rows get `<group>_segment_ids` (1, 2, ... per example; 0 is padding) and
`<group>_positions` (restarting at 0 in each segment) for the 'encoder' and 'decoder' groups of
features. `max_segments=1` (pack=False) puts one example in each row. Rows are dicts of int32
arrays (float32 for the loss weights); `stack_rows` makes a batch of them.

grain's `FirstFitPackIterDataset` with one bin is the same algorithm, but it is not used: it
packs one `IterDataset` stream, while the input pipeline packs each row slot of the global batch
from a lazily indexed global order (batches that do not depend on the process count, one integer
of state per slot; `t5like.data.pipeline`), and evaluation packs plain lists; it also names the
segment features per feature (`encoder_input_tokens_segment_ids`), not per group as the model
reads them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from t5like.data.objectives import DECODER_KEYS, ENCDEC_KEYS, ObjectiveError


def _group(key: str) -> str:
  return key.split('_', 1)[0]  # 'encoder' or 'decoder'


class Packer:
  """Greedy in-order packing of examples into rows of fixed `lengths` ({'encoder': S, 'decoder': T}).

  `fits(example)` says whether it joins the current row; `add` appends it; `row()` returns the
  padded row with segment ids and positions and starts a new one. `max_segments=1` disables packing.
  """

  def __init__(self, lengths: Mapping[str, int], max_segments: int | None = None):
    self.lengths = dict(lengths)
    self.max_segments = max_segments
    self._reset()

  def _reset(self):
    self._parts: list[dict[str, np.ndarray]] = []
    self._used = {g: 0 for g in self.lengths}

  def __len__(self) -> int:
    return len(self._parts)

  def _sizes(self, example) -> dict[str, int]:
    sizes = {}
    for key, value in example.items():
      g = _group(key)
      if g not in self.lengths:
        raise ObjectiveError(f'example feature {key!r} has no row length (have {self.lengths})')
      sizes[g] = max(sizes.get(g, 0), len(value))
    return sizes

  def fits(self, example) -> bool:
    if self.max_segments is not None and len(self._parts) >= self.max_segments:
      return False
    return all(self._used[g] + n <= self.lengths[g] for g, n in self._sizes(example).items())

  def add(self, example) -> None:
    sizes = self._sizes(example)
    for g, n in sizes.items():
      if n > self.lengths[g]:
        raise ObjectiveError(f'an example has {n} {g} tokens, more than the row length '
                             f'{self.lengths[g]}; raise data.inputs_length/targets_length or '
                             'shorten the chunks')
    if not self.fits(example):
      raise ObjectiveError('example does not fit the current row; call row() first')
    self._parts.append(example)
    for g, n in sizes.items():
      self._used[g] += n

  def row(self) -> dict[str, np.ndarray]:
    if not self._parts:
      raise ObjectiveError('no examples to pack into a row')
    keys = list(self._parts[0])
    out = {}
    for key in keys:
      g = _group(key)
      dtype = np.float32 if key.endswith('loss_weights') else np.int32
      buf = np.zeros(self.lengths[g], dtype)
      vals = np.concatenate([p[key] for p in self._parts])
      buf[:vals.size] = vals
      out[key] = buf
    for g in sorted({_group(k) for k in keys}):
      seg = np.zeros(self.lengths[g], np.int32)
      pos = np.zeros(self.lengths[g], np.int32)
      start = 0
      for i, p in enumerate(self._parts, start=1):
        n = len(p[f'{g}_target_tokens' if g == 'decoder' else f'{g}_input_tokens'])
        seg[start:start + n] = i
        pos[start:start + n] = np.arange(n)
        start += n
      out[f'{g}_segment_ids'] = seg
      out[f'{g}_positions'] = pos
    self._reset()
    return out


def empty_row(lengths: Mapping[str, int], arch: str) -> dict[str, np.ndarray]:
  """An all-padding row (every loss weight 0), used to fill the last eval batch."""
  keys = ENCDEC_KEYS if arch == 'encdec' else DECODER_KEYS
  return {k: np.zeros(lengths[_group(k)], np.float32 if k.endswith('loss_weights') else np.int32)
          for k in keys}


def pack_examples(examples: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int],
                  pack: bool = True) -> list[dict[str, np.ndarray]]:
  """Rows of `lengths` holding `examples` in order (one per row if not `pack`)."""
  packer = Packer(lengths, max_segments=None if pack else 1)
  rows = []
  for ex in examples:
    if len(packer) and not packer.fits(ex):
      rows.append(packer.row())
    packer.add(ex)
  if len(packer):
    rows.append(packer.row())
  return rows


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """A batch [B, L] per feature from B rows."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
