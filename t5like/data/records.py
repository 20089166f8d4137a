"""Preprocessed corpora as ArrayRecord files: token chunks written once, then read record by record.

For corpora past one machine's memory. `scripts/preprocess_corpus.py` streams the documents one at
a time (tokenise, cut into the run's chunks, append each chunk as one record) into a folder:

  <folder>/records.json            format, chunk length, counts, the data settings it was cut for
  <folder>/train.array_record      one record per training chunk (int32 token ids)
  <folder>/validation.array_record one record per validation chunk
  <folder>/validation.jsonl        the validation documents' text (for sampled continuations)
  <folder>/tokenizer.model         the SentencePiece model the ids come from

and training reads it with `data.corpus=<folder>`: `ChunkRecords` is a random-access source
(`len`, `[i]` -> int32 ids) that reads only the records asked for, so the input pipeline's memory
does not grow with the corpus, and each process reads only the records of its own rows of each
global batch (t5like.data.pipeline). ArrayRecord (`array_record`, installed with grain) is the
format grain reads natively; files are local or on a mounted file system.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import grain
import numpy as np
from array_record.python import array_record_module

from t5like import paths

META_FILE = 'records.json'
TRAIN_FILE = 'train.array_record'
VALIDATION_FILE = 'validation.array_record'
VALIDATION_DOCS = 'validation.jsonl'
TOKENIZER_FILE = 'tokenizer.model'
FORMAT = 't5like-chunks-1'


class RecordsError(ValueError):
  """A records folder is missing, incomplete or was cut for other settings; the message says which."""


def is_records(corpus: str) -> bool:
  """True when `corpus` is a folder written by scripts/preprocess_corpus.py."""
  if not corpus or corpus == 'shakespeare':
    return False
  return (paths.resolve(corpus) / META_FILE).exists()


def read_meta(folder: str) -> dict[str, Any]:
  meta = json.loads((paths.resolve(folder) / META_FILE).read_text())
  if meta.get('format') != FORMAT:
    raise RecordsError(f'{folder}/{META_FILE} has format {meta.get("format")!r}, not {FORMAT!r}; '
                       'rewrite the folder with scripts/preprocess_corpus.py')
  return meta


def write_chunks(path: str, chunks: Iterable[np.ndarray]) -> int:
  """Writes each chunk (int32 ids) as one record of a new ArrayRecord file; returns the count."""
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
  n = 0
  try:
    for chunk in chunks:
      writer.write(np.asarray(chunk, np.int32).tobytes())
      n += 1
  finally:
    writer.close()
  return n


class ChunkRecords:
  """Random-access token chunks of an ArrayRecord file; a record is read when indexed."""

  def __init__(self, path: str):
    if not os.path.exists(os.fspath(path)):
      raise RecordsError(f'{path} does not exist; write it with scripts/preprocess_corpus.py')
    self.path = os.fspath(path)
    self._source = grain.sources.ArrayRecordDataSource(self.path)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[int(index)], np.int32)

  def __repr__(self) -> str:
    return f'ChunkRecords({self.path!r}, {len(self)} chunks)'
