"""The grain pipeline: batch contract, resumable position, sharding, eval, global arrays."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from t5like.config import DataConfig
from t5like.data import objectives, pipeline
from t5like.data.pipeline import PipelineError

from tests.data.conftest import TINY_VOCAB


@pytest.fixture
def cfg(tiny_corpus_dir):
  return DataConfig(corpus=str(tiny_corpus_dir), vocab_size=TINY_VOCAB, validation_fraction=0.25,
                    inputs_length=32, batch_size=8)


def _make(cfg, workdir, arch='encdec', **kw):
  return pipeline.make_datasets(cfg, arch, str(workdir), seed=0, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_row_consistency(batch, group, vocab_size):
  seg = batch[f'{group}_segment_ids']
  pos = batch[f'{group}_positions']
  tokens = batch[f'{group}_target_tokens' if group == 'decoder' else f'{group}_input_tokens']
  assert (tokens[seg == 0] == 0).all() and (pos[seg == 0] == 0).all()
  assert tokens.max() < vocab_size
  for r in range(seg.shape[0]):
    for s in np.unique(seg[r][seg[r] > 0]):
      idx = np.flatnonzero(seg[r] == s)
      assert (np.diff(idx) == 1).all() and pos[r, idx].tolist() == list(range(idx.size))
      assert tokens[r, idx[-1]] == 1                     # every segment ends with EOS
      if group == 'decoder':                             # shifted right, restarting per segment
        inp, tgt = batch['decoder_input_tokens'][r, idx], batch['decoder_target_tokens'][r, idx]
        assert inp[0] == 0 and (inp[1:] == tgt[:-1]).all()


def test_encdec_batch_contract(cfg, tiny_workdir):
  train, eval_batches, tok = _make(cfg, tiny_workdir)
  lengths = pipeline.sequence_lengths(cfg, 'encdec')
  assert lengths == {'encoder': 32, 'decoder': objectives.random_spans_helper(32, .15, 3)[1]}
  assert tok.vocab_size == TINY_VOCAB + 100 and tok.model_vocab_size == 768
  for batch in _take(train, 3) + [next(eval_batches())]:
    assert sorted(batch) == sorted(objectives.ENCDEC_KEYS)
    for k, v in batch.items():
      assert v.shape == (8, lengths[k.split('_')[0]]), k
      assert v.dtype == (np.float32 if k == 'decoder_loss_weights' else np.int32), k
    _check_row_consistency(batch, 'encoder', tok.vocab_size)
    _check_row_consistency(batch, 'decoder', tok.vocab_size)
    np.testing.assert_array_equal(batch['encoder_segment_ids'].max(1), batch['decoder_segment_ids'].max(1))
    assert (batch['decoder_loss_weights'] == (batch['decoder_segment_ids'] > 0)).all()
    assert (batch['encoder_input_tokens'] >= tok.sp_size).any()   # sentinels in the inputs


@pytest.mark.parametrize('objective', ['causal_lm', 'prefix_lm', 'span_corruption'])
def test_decoder_only_batch_contract(cfg, tiny_workdir, objective):
  cfg = DataConfig(**{**cfg.__dict__, 'objective': objective})
  train, eval_batches, tok = _make(cfg, tiny_workdir, arch='decoder')
  T = pipeline.sequence_lengths(cfg, 'decoder')['decoder']
  for batch in _take(train, 2) + [next(eval_batches())]:
    assert sorted(batch) == sorted(objectives.DECODER_KEYS)
    assert all(v.shape == (8, T) for v in batch.values())
    _check_row_consistency(batch, 'decoder', tok.vocab_size)
    real = batch['decoder_segment_ids'] > 0
    w = batch['decoder_loss_weights']
    assert (w[~real] == 0).all()
    if objective == 'causal_lm':
      assert (w[real] == 1).all()
    else:   # no loss on the prefix / corrupted inputs
      assert (w[real] == 0).any() and (w[real] == 1).any()


def test_causal_lm_is_rejected_for_encdec(cfg):
  with pytest.raises(PipelineError, match="causal_lm' needs a decoder-only"):
    pipeline.sequence_lengths(DataConfig(**{**cfg.__dict__, 'objective': 'causal_lm'}), 'encdec')


@pytest.mark.parametrize('overrides,n,m', [
    ({}, 4, 6),
    ({'batch_size': 64}, 12, 8),  # crosses the epoch boundary (an epoch is ~16 batches of 64)
    ({'num_workers': 2, 'mask_prob': 0.1, 'delete_prob': 0.05, 'reorder_prob': 0.5,
      'swap_prob': 0.1, 'drop_function_word_prob': 0.2}, 3, 5),
    ({'pack': False}, 3, 4),
])
def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(cfg, tiny_workdir, overrides, n, m):
  cfg = DataConfig(**{**cfg.__dict__, **overrides})
  train, _, _ = _make(cfg, tiny_workdir)
  _take(train, n)
  state = json.loads(json.dumps(train.get_state()))   # what a checkpoint stores
  expected = _take(train, m)
  if cfg.batch_size == 64:   # the global index each row slot reads next, before and after
    index = lambda st: [r + p * 64 for r, p in enumerate(st['positions'])]
    assert max(index(state)) < state['num_chunks'] < min(index(train.get_state()))
  fresh, _, _ = _make(cfg, tiny_workdir)
  fresh.set_state(state)
  _assert_same(_take(fresh, m), expected)
  # Restoring the same state again rewinds the same iterator.
  train.set_state(state)
  _assert_same(_take(train, m), expected)


def test_set_state_rejects_a_state_of_another_pipeline(cfg, tiny_workdir):
  train, _, _ = _make(cfg, tiny_workdir)
  other, _, _ = _make(DataConfig(**{**cfg.__dict__, 'batch_size': 16}), tiny_workdir)
  with pytest.raises(PipelineError, match='different pipeline.*batch_size'):
    other.set_state(train.get_state())
  with pytest.raises(PipelineError, match='not a version-2'):
    train.set_state({'next_index': 3})


def _causal_unpacked(cfg, tiny_workdir, **kw):
  cfg = DataConfig(**{**cfg.__dict__, 'objective': 'causal_lm', 'pack': False})
  return cfg, _make(cfg, tiny_workdir, arch='decoder', **kw)


def _row_chunks(batch):
  """The chunk each unpacked causal-LM row holds (its targets without EOS)."""
  out = []
  for tgt, seg in zip(batch['decoder_target_tokens'], batch['decoder_segment_ids']):
    out.append(tuple(tgt[seg == 1][:-1].tolist()))
  return out


def test_epochs_shuffle_differently_and_cover_the_shard(cfg, tiny_workdir):
  cfg, (train, _, tok) = _causal_unpacked(cfg, tiny_workdir)
  train_docs, _ = pipeline.load_splits(cfg)
  chunk_len = objectives.chunk_length('causal_lm', 'decoder', train.lengths, .15, 3)
  chunks = [tuple(c.tolist()) for c in pipeline.make_chunks(train_docs, tok, chunk_len)]
  n = len(chunks)
  rows = []
  while len(rows) < 2 * n:
    rows.extend(_row_chunks(next(train)))
  epoch0, epoch1 = rows[:n], rows[n:2 * n]
  assert sorted(epoch0) == sorted(chunks) == sorted(epoch1)
  assert epoch0 != epoch1 and epoch0 != chunks


def test_sharded_per_process(cfg, tiny_workdir):
  # Each process builds its rows of the global batches: together exactly the one-process batches
  # (packed, augmented), so the process count does not change training.
  cfg = DataConfig(**{**cfg.__dict__, 'mask_prob': 0.1, 'reorder_prob': 0.5})
  whole, _, _ = _make(cfg, tiny_workdir)
  parts = [_make(cfg, tiny_workdir, process_index=pi, process_count=2)[0] for pi in range(2)]
  assert parts[0].batch_size == 4 and list(parts[1].rows) == [4, 5, 6, 7]
  for _ in range(20):   # past an epoch of the tiny corpus
    full, halves = next(whole), [next(p) for p in parts]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), full[k])
  # One process count's saved position restores another's (the state is global).
  positions = whole.get_state()['positions']
  parts[1].set_state(whole.get_state())
  assert parts[1]._next.tolist() == positions[4:]
  # Unpacked, a process reads only its rows' chunks: rows 0-3 of every batch on process 0.
  _, (train, _, tok) = _causal_unpacked(cfg, tiny_workdir, process_index=0, process_count=2)
  _, (one, _, _) = _causal_unpacked(cfg, tiny_workdir)
  for _ in range(3):
    assert _row_chunks(next(train)) == _row_chunks(next(one))[:4]
  with pytest.raises(PipelineError, match='batch_size=8 .* not divisible by the process count 3'):
    _causal_unpacked(cfg, tiny_workdir, process_index=0, process_count=3)


def test_eval_is_finite_deterministic_unaugmented_and_equal_across_processes(cfg, tiny_workdir):
  _, eval_batches, _ = _make(cfg, tiny_workdir)
  first, second = list(eval_batches()), list(eval_batches())
  assert len(first) > 1
  _assert_same(first, second)
  augmented = DataConfig(**{**cfg.__dict__, 'mask_prob': 0.3, 'delete_prob': 0.3,
                            'reorder_prob': 1.0, 'swap_prob': 0.5, 'drop_function_word_prob': 0.5})
  _, eval_aug, _ = _make(augmented, tiny_workdir)
  _assert_same(list(eval_aug()), first)               # validation data is never augmented
  per_process = [list(_make(cfg, tiny_workdir, process_index=pi, process_count=2)[1]())
                 for pi in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == len(first)
  for b0, b1, full in zip(*per_process, first):
    for k in full:
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), full[k])
  padding_rows = [(b['encoder_segment_ids'].max(1) == 0).sum() for b in first]
  assert sum(padding_rows[:-1]) == 0 and padding_rows[-1] < 8   # only the last batch is filled
  assert (first[-1]['decoder_loss_weights'][first[-1]['decoder_segment_ids'] == 0] == 0).all()


def test_train_iterator_is_infinite(cfg, tiny_workdir):
  cfg = DataConfig(**{**cfg.__dict__, 'batch_size': 256})
  train, _, _ = _make(cfg, tiny_workdir)
  for _ in range(6):   # several epochs of this tiny corpus
    assert next(train)['encoder_input_tokens'].shape == (256, 32)


def test_to_global_batch_shards_over_data_and_fsdp(cfg, tiny_workdir):
  train, _, _ = _make(cfg, tiny_workdir)
  batch = next(train)
  devices = np.array(jax.devices()[:8])
  for shape, names in [((4, 2), ('data', 'fsdp')), ((2, 2, 2), ('data', 'fsdp', 'tensor'))]:
    mesh = Mesh(devices.reshape(shape), names)
    out = pipeline.to_global_batch(batch, mesh)
    for k, v in out.items():
      assert isinstance(v, jax.Array) and v.shape == batch[k].shape
      assert v.sharding.spec == P(('data', 'fsdp'))
      np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert len(out['encoder_input_tokens'].addressable_shards) == 8
    assert out['encoder_input_tokens'].addressable_shards[0].data.shape == (8 // (shape[0] * shape[1]), 32)
  mesh = Mesh(devices.reshape(4, 2), ('data', 'fsdp'))
  out = pipeline.to_global_batch(batch, mesh, {'encoder_input_tokens': P('data')})
  assert out['encoder_input_tokens'].sharding.spec == P('data')
  with pytest.raises(PipelineError, match=r"missing \['fsdp'\]"):
    pipeline.to_global_batch(batch, Mesh(devices, ('data',)))
  small = {k: v[:6] for k, v in batch.items()}
  with pytest.raises(PipelineError, match='not divisible by the mesh.s data x fsdp = 8'):
    pipeline.to_global_batch(small, mesh)


def test_bad_corpus_is_a_clear_error(tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match='empty.txt is empty'):
    pipeline.make_datasets(DataConfig(corpus=str(tmp_path)), 'encdec', str(tmp_path / 'wd'))


@pytest.mark.slow
def test_shakespeare_defaults(tmp_path):
  cfg = DataConfig(batch_size=8)
  train, eval_batches, tok = pipeline.make_datasets(cfg, 'encdec', str(tmp_path), seed=0)
  assert tok.model_vocab_size == 8192
  batch = next(train)
  assert batch['encoder_input_tokens'].shape == (8, 128)
  assert batch['decoder_target_tokens'].shape == (8, 29)
  assert (batch['encoder_segment_ids'] > 0).mean() > 0.9   # full chunks: little padding
  assert sum(1 for _ in eval_batches()) > 10


@pytest.mark.parametrize('objective,arch', [('span_corruption', 'encdec'), ('causal_lm', 'decoder')])
def test_lazy_document_chunks_equal_the_tokenised_chunks(cfg, tiny_workdir, objective, arch):
  # The plain-text corpus is tokenised per chunk when a row reads it; the chunks and therefore the
  # batches are those of tokenising the whole corpus up front.
  cfg = DataConfig(**{**cfg.__dict__, 'objective': objective, 'inputs_length': 24})
  train, _, tok = _make(cfg, tiny_workdir, arch=arch)
  docs, _ = pipeline.load_splits(cfg)
  n = objectives.chunk_length(objective, arch, train.lengths, .15, 3)
  eager = pipeline.make_chunks(docs, tok, n)
  lazy = pipeline.DocumentChunks(docs, tok, n)
  assert len(lazy) == len(eager) > 50
  for i in [0, 1, len(eager) - 1] + list(range(2, len(eager), 7)):
    np.testing.assert_array_equal(lazy[i], eager[i], err_msg=str(i))
  with pytest.raises(IndexError, match='out of range'):
    lazy[len(eager)]
  up_front = pipeline.make_train_iterator(eager, cfg, arch, tok, seed=0)
  _assert_same(_take(train, 4), _take(up_front, 4))


def test_document_index_counts_are_split_over_processes(cfg, tiny_workdir):
  # With P processes each tokenises every P-th line for the index, and the summed counts give the
  # index one process would build alone.
  train, _, tok = _make(cfg, tiny_workdir)
  docs, _ = pipeline.load_splits(cfg)
  lines = [l for d in docs for l in d.text.splitlines() if l.strip()]
  parts = [pipeline.count_line_tokens(lines, tok, p, 3) for p in range(3)]
  for p, part in enumerate(parts):
    assert (part[p::3] > 0).all() and not np.delete(part, np.s_[p::3]).any()
  np.testing.assert_array_equal(sum(parts), pipeline.count_line_tokens(lines, tok))
  n = 29
  alone = pipeline.DocumentChunks(docs, tok, n)
  seen = []

  def gather(mine):   # stands in for the all-gather: this process's counts plus the others'
    seen.append(mine)
    return mine + sum(parts[p] for p in range(3) if p != 1)

  sharded = pipeline.DocumentChunks(docs, tok, n, process_index=1, process_count=3, gather=gather)
  np.testing.assert_array_equal(seen[0], parts[1])
  assert len(sharded) == len(alone) > 50
  for i in range(0, len(alone), 5):
    np.testing.assert_array_equal(sharded[i], alone[i], err_msg=str(i))
