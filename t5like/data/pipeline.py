"""The input pipeline: corpus -> tokenizer -> chunks -> augmentation -> objective -> packed batches.

Entry point (what the trainer calls):

  train_iter, eval_batches, tokenizer = make_datasets(data_cfg, model_arch, workdir, seed=0)

- `data_cfg`: `t5like.config.DataConfig`; `model_arch`: 'encdec' or 'decoder' (ModelConfig.arch);
  `workdir`: the run's folder (the trained tokenizer is cached under `<workdir>/tokenizer/`);
  `seed`: the run seed, combined with `data_cfg.shuffle_seed` / `augment_seed`.
- `train_iter`: a `RowSlotIterator`, infinite over epochs; `next(train_iter)` is this process's
  share of the global batch (per-process batch = data_cfg.batch_size // jax.process_count(), an
  error if not divisible) as a dict of numpy arrays. `train_iter.get_state()` is a JSON-able dict
  and `train_iter.set_state(state)` restores it: a resumed run sees exactly the batches an
  uninterrupted one would have seen. The global batches are the same whatever the process count
  (1 x 8 devices or 2 x 4 give the same losses), and each process reads and preprocesses only the
  examples of its own rows.
- `eval_batches()`: a fresh, finite, deterministic iterator over the validation split (no
  augmentation), same dicts; every process gets the same number of batches and the last one is
  filled with all-padding rows (loss weights 0).
- `tokenizer`: a `t5like.data.tokenizer.Tokenizer`; the model's embedding size is
  `tokenizer.model_vocab_size` (a multiple of 128).

Batch keys (T5X names; B = per-process batch, S = encoder length, T = decoder length, from
`sequence_lengths(data_cfg, model_arch)`), int32 except the float32 loss weights:
  'encdec':  encoder_input_tokens, encoder_segment_ids, encoder_positions  [B, S];
             decoder_input_tokens, decoder_target_tokens, decoder_segment_ids, decoder_positions,
             decoder_loss_weights  [B, T]
  'decoder': decoder_input_tokens, decoder_target_tokens, decoder_segment_ids, decoder_positions,
             decoder_loss_weights  [B, T]   (T = inputs_length + targets_length)
Segment ids are 1, 2, ... per packed example and 0 on padding; positions restart at 0 per segment.

`to_global_batch(batch, mesh, batch_spec=None)` turns the per-process numpy batch into global
`jax.Array`s sharded over the mesh's ('data', 'fsdp') axes.

With grain: the training chunks (a `DocumentChunks` index of the plain-text corpus, tokenised chunk
by chunk when read, or an ArrayRecord file read record by record) are a `grain.MapDataset`,
shuffled with a per-epoch seed, repeated forever, augmented and turned into examples by a seeded
`random_map` (seeded per element index, so per epoch), all lazily: an element is read and computed
only when indexed. Row r of the global batch B (a "slot") packs the elements r, r + B, r + 2B, ...
of that global order; process p owns rows [p*B/P, (p+1)*B/P), so it touches only 1/P of the
elements, and the batches do not depend on P. Packing and batching happen in `RowSlotIterator`,
whose state is each row's next element (gathered from every process, so one saved state restores
any process count). `num_workers` > 0 builds a batch's rows on that many threads. The task
pipeline (t5like.data.task_pipeline) uses the same iterator. The plain-text index's token counts
are split over the processes too (`DocumentChunks`); every process holds the corpus text, so data
past one machine's memory goes through an ArrayRecord folder (t5like.data.records).
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from t5like import paths
from t5like.config import ARCHS

from t5like.data import augment as augment_lib
from t5like.data import corpus as corpus_lib
from t5like.data import objectives
from t5like.data import packing
from t5like.data import records as records_lib
from t5like.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

BATCH_AXES = ('data', 'fsdp')
_SLOT_STATE_VERSION = 2


class PipelineError(ValueError):
  """The pipeline cannot be built or restored; the message names the setting or state."""


def sequence_lengths(data_cfg, model_arch: str) -> dict[str, int]:
  """Row lengths: {'encoder': S, 'decoder': T} for 'encdec', {'decoder': T} for 'decoder'."""
  if model_arch not in ARCHS:
    raise PipelineError(f'model arch {model_arch!r} is not valid; choose one of {list(ARCHS)}')
  if data_cfg.objective == 'causal_lm' and model_arch != 'decoder':
    raise PipelineError("data.objective='causal_lm' needs a decoder-only model (arch 'decoder'); "
                        "for 'encdec' use 'span_corruption' or 'prefix_lm'")
  inputs_length = data_cfg.inputs_length
  targets_length = data_cfg.targets_length
  if targets_length == 0:
    if data_cfg.objective == 'span_corruption':
      targets_length = objectives.random_spans_helper(
          inputs_length, data_cfg.noise_density, data_cfg.mean_noise_span_length)[1]
    else:
      targets_length = inputs_length
  if model_arch == 'encdec':
    return {'encoder': inputs_length, 'decoder': targets_length}
  return {'decoder': inputs_length + targets_length}


def make_chunks(docs: Sequence[corpus_lib.Document], tokenizer: tokenizer_lib.Tokenizer,
                chunk_length: int) -> list[np.ndarray]:
  """Each document tokenised line by line, concatenated, cut into chunks of `chunk_length` ids."""
  chunks = []
  for doc in docs:
    lines = [l for l in doc.text.splitlines() if l.strip()]
    if not lines:
      continue
    ids = np.concatenate([np.asarray(x, np.int32) for x in tokenizer.encode_batch(lines)])
    chunks.extend(ids[i:i + chunk_length] for i in range(0, ids.size, chunk_length))
  return chunks


class DocumentChunks:
  """The chunks `make_chunks` returns, as a random-access sequence that keeps only each line's
  token count: chunk i is tokenised when it is read (just the lines it spans), so a process holds
  no token ids and tokenises again only the chunks its rows read.

  Chunk boundaries depend on every line's token count, so the index needs them all: with
  `process_count` > 1, process p counts lines p, p + P, ... and the counts are summed over
  processes by `gather` (default: an all-gather over `jax.distributed`), so each line is tokenised
  for the index by one process only."""

  def __init__(self, docs: Sequence[corpus_lib.Document], tokenizer: tokenizer_lib.Tokenizer,
               chunk_length: int, *, process_index: int = 0, process_count: int = 1,
               gather: Callable[[np.ndarray], np.ndarray] | None = None):
    self._tokenizer, self._chunk_length = tokenizer, chunk_length
    doc_lines = [[l for l in doc.text.splitlines() if l.strip()] for doc in docs]
    doc_lines = [lines for lines in doc_lines if lines]
    counts = count_line_tokens([l for lines in doc_lines for l in lines], tokenizer,
                               process_index, process_count)
    if process_count > 1:
      counts = (gather or _sum_over_processes)(counts)
    self._docs = []      # per document with text: (its non-blank lines, token end of each line)
    starts = []          # global index of each document's first chunk
    total, at = 0, 0
    for lines in doc_lines:
      ends = np.cumsum(counts[at:at + len(lines)], dtype=np.int64)
      at += len(lines)
      self._docs.append((lines, ends))
      starts.append(total)
      total += -(-int(ends[-1]) // chunk_length)
    self._starts, self._len = np.asarray(starts, np.int64), total

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> np.ndarray:
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(f'chunk {i} is out of range (0..{self._len - 1})')
    d = int(np.searchsorted(self._starts, i, side='right')) - 1
    lines, ends = self._docs[d]
    lo = (i - int(self._starts[d])) * self._chunk_length
    hi = min(lo + self._chunk_length, int(ends[-1]))
    first = int(np.searchsorted(ends, lo, side='right'))   # the line holding token lo
    last = int(np.searchsorted(ends, hi, side='left'))     # the line holding token hi - 1
    base = int(ends[first - 1]) if first else 0
    # A few lines: encoding them one by one beats the batch call's thread start-up.
    ids = np.concatenate([np.asarray(self._tokenizer.encode(l), np.int32)
                          for l in lines[first:last + 1]])
    return ids[lo - base:hi - base]


def count_line_tokens(lines: Sequence[str], tokenizer: tokenizer_lib.Tokenizer,
                      process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Token count of each line; with `process_count` > 1 only this process's lines (every
  `process_count`-th, from `process_index`) are counted and the others left 0."""
  counts = np.zeros(len(lines), np.int64)
  mine = lines[process_index::process_count]
  if mine:
    counts[process_index::process_count] = [len(x) for x in tokenizer.encode_batch(mine)]
  return counts


def _sum_over_processes(counts: np.ndarray) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)


def _derive_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


class _ExampleFn:
  """chunk ids (+ rng) -> model features of one example; augments when `augmenter` is given."""

  def __init__(self, data_cfg, model_arch, lengths, chunk_length, tokenizer, augmenter=None):
    self.data_cfg, self.arch, self.lengths = data_cfg, model_arch, lengths
    self.chunk_length, self.tokenizer, self.augmenter = chunk_length, tokenizer, augmenter

  def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    aug = self.augmenter
    if aug is not None and aug.active:
      original = ids
      if aug.text_active:
        ids = np.asarray(self.tokenizer.encode(aug.augment_text(self.tokenizer.decode(ids), rng)),
                         np.int32)
      ids = aug.augment_tokens(ids, rng, self.tokenizer.unk_id)
      ids = ids[:self.chunk_length]  # augmentation can re-tokenise a few ids longer
      if ids.size == 0:
        ids = original
    cfg = self.data_cfg
    return objectives.make_example(ids, rng, objective=cfg.objective, arch=self.arch,
                                   lengths=self.lengths, vocab_size=self.tokenizer.vocab_size,
                                   eos_id=self.tokenizer.eos_id, noise_density=cfg.noise_density,
                                   mean_noise_span_length=cfg.mean_noise_span_length)


class RowSlotIterator:
  """Infinite iterator of this process's rows of every global batch, from a lazily indexed global
  example order; checkpointable as one global state (see the module docstring).

  `examples`: a `grain.MapDataset` (or anything indexable) of model features, the global order.
  Row slot r of the global batch `global_batch` packs examples r, r + B, r + 2B, ... (B =
  `global_batch`); this process builds the rows `rows` (a range of slots).
  """

  def __init__(self, examples, lengths: Mapping[str, int], *, pack: bool, global_batch: int,
               rows: range, fingerprint: Mapping[str, Any], num_threads: int = 0,
               process_count: int = 1):
    self.lengths = dict(lengths)
    self.global_batch, self.rows, self.pack = global_batch, rows, pack
    self.batch_size = len(rows)
    self._examples = examples
    self._fingerprint = dict(fingerprint)
    self._next = np.zeros(len(rows), np.int64)    # per slot: index of its next example
    self._num_threads, self._process_count = num_threads, process_count
    self._pool = None

  def __iter__(self) -> 'RowSlotIterator':
    return self

  def _row(self, i: int) -> dict[str, np.ndarray]:
    packer = packing.Packer(self.lengths, max_segments=None if self.pack else 1)
    slot, B = self.rows[i], self.global_batch
    while True:
      ex = self._examples[int(slot + self._next[i] * B)]
      if len(packer) and not packer.fits(ex):
        return packer.row()        # this example starts the slot's next row
      packer.add(ex)
      self._next[i] += 1
      if not self.pack:
        return packer.row()

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_threads > 0:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads)
      rows = list(self._pool.map(self._row, range(self.batch_size)))
    else:
      rows = [self._row(i) for i in range(self.batch_size)]
    return packing.stack_rows(rows)

  def get_state(self) -> dict[str, Any]:
    """JSON-able global position: every slot's next example. With several processes this is a
    collective (each process contributes its rows): call it on all of them, as a checkpoint does."""
    positions = self._next
    if self._process_count > 1:
      positions = np.asarray(multihost_utils.process_allgather(self._next)).reshape(-1)
    return {'version': _SLOT_STATE_VERSION, 'positions': [int(x) for x in positions],
            **self._fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get('version') != _SLOT_STATE_VERSION:
      raise PipelineError(f'data iterator state {str(state)[:200]} is not a version-'
                          f'{_SLOT_STATE_VERSION} RowSlotIterator state; start a fresh workdir')
    diff = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
    if diff:
      raise PipelineError('data iterator state was saved by a different pipeline; mismatched '
                          f'(saved, now): {diff}. Resume with the same data config, or start a '
                          'fresh workdir')
    positions = state['positions']
    if len(positions) != self.global_batch:
      raise PipelineError(f'data iterator state has {len(positions)} row positions, not the '
                          f'global batch {self.global_batch}')
    self._next = np.asarray([positions[r] for r in self.rows], np.int64)


def _process_shard(process_index, process_count, global_batch):
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise PipelineError(f'data.batch_size={global_batch} (the global batch) is not divisible by '
                        f'the process count {pc}; make it a multiple of {pc}')
  return pi, pc, global_batch // pc


def make_train_iterator(chunks, data_cfg, model_arch: str,
                        tokenizer: tokenizer_lib.Tokenizer, *, seed: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None) -> RowSlotIterator:
  """The training `RowSlotIterator` over `chunks` (a sequence of id arrays, or a random-access
  source such as an ArrayRecord reader): this process's rows of every global batch."""
  lengths = sequence_lengths(data_cfg, model_arch)
  chunk_length = objectives.chunk_length(data_cfg.objective, model_arch, lengths,
                                         data_cfg.noise_density, data_cfg.mean_noise_span_length)
  pi, pc, local_batch = _process_shard(process_index, process_count, data_cfg.batch_size)
  if len(chunks) == 0:
    raise PipelineError('the training split has no chunks; use a larger corpus')
  fn = _ExampleFn(data_cfg, model_arch, lengths, chunk_length, tokenizer,
                  augment_lib.Augmenter.from_config(data_cfg))
  ds = grain.MapDataset.source(chunks)
  ds = ds.shuffle(seed=_derive_seed(seed, data_cfg.shuffle_seed, 1)).repeat(None)
  ds = ds.random_map(fn, seed=_derive_seed(seed, data_cfg.augment_seed, 2))
  fingerprint = {'batch_size': data_cfg.batch_size, 'lengths': dict(lengths),
                 'num_chunks': len(chunks), 'pack': data_cfg.pack,
                 'objective': data_cfg.objective}
  return RowSlotIterator(ds, lengths, pack=data_cfg.pack, global_batch=data_cfg.batch_size,
                         rows=range(pi * local_batch, (pi + 1) * local_batch),
                         fingerprint=fingerprint, num_threads=data_cfg.num_workers,
                         process_count=pc)


def make_eval_batches(chunks: Sequence[np.ndarray], data_cfg, model_arch: str,
                      tokenizer: tokenizer_lib.Tokenizer, *, seed: int = 0,
                      process_index: int | None = None,
                      process_count: int | None = None) -> Callable[[], Iterator[dict]]:
  """A factory of fresh, finite, deterministic iterators over the evaluation `chunks`."""
  lengths = sequence_lengths(data_cfg, model_arch)
  chunk_length = objectives.chunk_length(data_cfg.objective, model_arch, lengths,
                                         data_cfg.noise_density, data_cfg.mean_noise_span_length)
  pi, pc, local_batch = _process_shard(process_index, process_count, data_cfg.batch_size)
  fn = _ExampleFn(data_cfg, model_arch, lengths, chunk_length, tokenizer, augmenter=None)
  eval_seed = _derive_seed(seed, data_cfg.shuffle_seed, 3)
  cache: list[dict[str, np.ndarray]] = []

  def rows():
    if not cache:
      examples = [fn(c, np.random.default_rng([eval_seed, i])) for i, c in enumerate(chunks)]
      packed = packing.pack_examples(examples, lengths, pack=data_cfg.pack)
      global_batch = data_cfg.batch_size
      packed += [packing.empty_row(lengths, model_arch)] * (-len(packed) % global_batch)
      cache.extend(packed)
    return cache

  def eval_batches() -> Iterator[dict[str, np.ndarray]]:
    all_rows = rows()
    g = data_cfg.batch_size
    for start in range(0, len(all_rows), g):
      yield packing.stack_rows(all_rows[start + pi * local_batch:start + (pi + 1) * local_batch])

  return eval_batches


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                    batch_spec: P | Mapping[str, P] | None = None) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays, the batch dim sharded over ('data', 'fsdp').

  `batch_spec`: one PartitionSpec for every key, or a dict of them; default P(('data', 'fsdp')).
  """
  missing = [a for a in BATCH_AXES if a not in mesh.axis_names]
  if missing:
    raise PipelineError(f'the mesh has axes {mesh.axis_names}; the batch needs axes {BATCH_AXES} '
                        f'(missing {missing})')
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  out = {}
  for key, local in batch.items():
    spec = (batch_spec.get(key, P(BATCH_AXES)) if isinstance(batch_spec, Mapping)
            else batch_spec or P(BATCH_AXES))
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    if global_shape[0] % shards:
      raise PipelineError(f'global batch {global_shape[0]} of {key!r} is not divisible by the '
                          f"mesh's data x fsdp = {shards} devices; make data.batch_size a "
                          f'multiple of {shards}')
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local,
                                                      global_shape)
  return out


def load_splits(data_cfg) -> tuple[list[corpus_lib.Document], list[corpus_lib.Document]]:
  """(train, validation) documents of `data_cfg.corpus`; for a records folder (t5like.data.records)
  no training documents (they are token records) and the validation documents it keeps."""
  if records_lib.is_records(data_cfg.corpus):
    path = str(paths.resolve(data_cfg.corpus) / records_lib.VALIDATION_DOCS)
    return [], corpus_lib.load_documents(path, text_field='text')
  docs = corpus_lib.load_documents(data_cfg.corpus, text_field=data_cfg.text_field,
                                   on_bad_file=data_cfg.on_bad_file)
  return corpus_lib.split_documents(docs, data_cfg.validation_fraction, data_cfg.split_seed)


def make_datasets(data_cfg, model_arch: str, workdir: str, *, seed: int = 0,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> tuple[RowSlotIterator, Callable[[], Iterator[dict]],
                             tokenizer_lib.Tokenizer]:
  """(train_iter, eval_batches factory, tokenizer); see the module docstring."""
  lengths = sequence_lengths(data_cfg, model_arch)
  if records_lib.is_records(data_cfg.corpus):
    return _records_datasets(data_cfg, model_arch, lengths, seed=seed, process_index=process_index,
                             process_count=process_count)
  train_docs, val_docs = load_splits(data_cfg)
  tok = tokenizer_lib.load_or_train(train_docs, workdir, tokenizer_path=data_cfg.tokenizer,
                                    vocab_size=data_cfg.vocab_size,
                                    max_sentences=data_cfg.tokenizer_max_sentences,
                                    seed=data_cfg.split_seed)
  chunk_length = objectives.chunk_length(data_cfg.objective, model_arch, lengths,
                                         data_cfg.noise_density, data_cfg.mean_noise_span_length)
  # Tokenised when a row reads it; the index's token counts are split over the real processes.
  train_chunks = DocumentChunks(train_docs, tok, chunk_length, process_index=jax.process_index(),
                                process_count=jax.process_count())
  val_chunks = make_chunks(val_docs, tok, chunk_length)
  if not val_chunks:
    raise PipelineError(f'the validation split ({[d.name for d in val_docs]}) has no text')
  log.info('data: %d train / %d validation documents, %d / %d chunks of <= %d tokens, rows %s',
           len(train_docs), len(val_docs), len(train_chunks), len(val_chunks), chunk_length,
           lengths)
  kw = dict(seed=seed, process_index=process_index, process_count=process_count)
  train_iter = make_train_iterator(train_chunks, data_cfg, model_arch, tok, **kw)
  eval_batches = make_eval_batches(val_chunks, data_cfg, model_arch, tok, **kw)
  return train_iter, eval_batches, tok


def _records_datasets(data_cfg, model_arch, lengths, *, seed, process_index, process_count):
  """make_datasets over a folder of preprocessed chunks (t5like.data.records): the training chunks
  are read record by record (only this process's rows' records), never all at once."""
  folder = paths.resolve(data_cfg.corpus)
  meta = records_lib.read_meta(data_cfg.corpus)
  chunk_length = objectives.chunk_length(data_cfg.objective, model_arch, lengths,
                                         data_cfg.noise_density, data_cfg.mean_noise_span_length)
  if meta['chunk_length'] != chunk_length:
    raise PipelineError(f'records folder {data_cfg.corpus} holds chunks of {meta["chunk_length"]} '
                        f'tokens, but this run (objective {data_cfg.objective!r}, lengths '
                        f'{lengths}) needs {chunk_length}; preprocess it again with this config')
  tok = tokenizer_lib.Tokenizer.from_file(
      data_cfg.tokenizer or paths.as_str(folder / records_lib.TOKENIZER_FILE))
  train_chunks = records_lib.ChunkRecords(paths.as_str(folder / records_lib.TRAIN_FILE))
  val = records_lib.ChunkRecords(paths.as_str(folder / records_lib.VALIDATION_FILE))
  val_chunks = [val[i] for i in range(len(val))]   # the validation split is small
  kw = dict(seed=seed, process_index=process_index, process_count=process_count)
  return (make_train_iterator(train_chunks, data_cfg, model_arch, tok, **kw),
          make_eval_batches(val_chunks, data_cfg, model_arch, tok, **kw), tok)
