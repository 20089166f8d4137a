"""Preprocessed ArrayRecord corpora: the chunks are the in-memory pipeline's, read record by record,
and training batches from the records folder equal those from the text corpus."""
import importlib.util
import os

import numpy as np
import pytest

from t5like.config import DataConfig, TrainConfig, get_variant
from t5like.data import pipeline, records
from t5like.data.pipeline import PipelineError

from tests.data.conftest import TINY_VOCAB

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    'preprocess_corpus', os.path.join(ROOT, 'scripts', 'preprocess_corpus.py'))
preprocess_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_corpus)


@pytest.fixture(scope='module')
def setup(tiny_corpus_dir, tmp_path_factory):
  data = DataConfig(corpus=str(tiny_corpus_dir), vocab_size=TINY_VOCAB, validation_fraction=0.25,
                    inputs_length=32, batch_size=8, mask_prob=0.1)
  cfg = TrainConfig(model=get_variant('t5_tiny'), data=data)
  out = tmp_path_factory.mktemp('records') / 'tiny'
  summary = preprocess_corpus.preprocess(cfg, str(out))
  return cfg, out, summary


def test_records_batches_equal_the_text_pipelines(setup, tmp_path):
  cfg, out, summary = setup
  assert records.is_records(str(out)) and not records.is_records(cfg.data.corpus)
  assert summary['train_documents'] == 6 and summary['validation_documents'] == 2
  text_train, text_eval, text_tok = pipeline.make_datasets(cfg.data, 'encdec', str(tmp_path))
  rec_data = DataConfig(**{**cfg.data.__dict__, 'corpus': str(out)})
  rec_train, rec_eval, rec_tok = pipeline.make_datasets(rec_data, 'encdec', str(tmp_path / 'r'))
  assert rec_tok.model_proto == text_tok.model_proto   # all lines sampled: the same tokenizer
  assert rec_train.get_state()['num_chunks'] == summary['num_train_chunks']
  assert rec_train.get_state()['num_chunks'] == text_train.get_state()['num_chunks']
  for _ in range(5):
    a, b = next(text_train), next(rec_train)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for a, b in zip(text_eval(), rec_eval()):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  _, val_docs = pipeline.load_splits(rec_data)
  assert len(val_docs) == 2 and all(d.text for d in val_docs)


def test_chunk_records_read_lazily_and_mismatch_is_an_error(setup):
  cfg, out, summary = setup
  source = records.ChunkRecords(str(out / records.TRAIN_FILE))
  assert len(source) == summary['num_train_chunks']
  assert source[3].dtype == np.int32 and 0 < source[3].size <= summary['chunk_length']
  other = DataConfig(**{**cfg.data.__dict__, 'corpus': str(out), 'inputs_length': 64})
  with pytest.raises(PipelineError, match='needs .* preprocess it again'):
    pipeline.make_datasets(other, 'encdec', str(out / 'w'))
  with pytest.raises(records.RecordsError, match='does not exist'):
    records.ChunkRecords(str(out / 'missing.array_record'))
  with pytest.raises(SystemExit, match='already holds records'):
    preprocess_corpus.preprocess(cfg, str(out))


def test_reservoir_sample_is_bounded_and_deterministic():
  from t5like.data.corpus import Document
  docs = [Document(f'd{i}', '\n'.join(f'{i}-{j}' for j in range(100))) for i in range(10)]
  a = preprocess_corpus.reservoir_lines(docs, 50, seed=1)
  assert len(a) == 50 and a == preprocess_corpus.reservoir_lines(docs, 50, seed=1)
  assert len({l.split('-')[0] for l in a}) > 3        # drawn from across the stream
  assert preprocess_corpus.reservoir_lines(docs[:1], 500, seed=1) == [f'0-{j}' for j in range(100)]
