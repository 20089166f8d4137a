"""SentencePiece tokenizer with T5's id layout, trained on the training split or loaded.

Vocabulary layout (T5's, as in seqio's `SentencePieceVocabulary(extra_ids=100)`):

  id 0 `<pad>`, id 1 `</s>` (EOS), id 2 `<unk>`, then the SentencePiece pieces (with byte fallback,
  the 256 `<0xNN>` byte pieces come first), up to `sp_size - 1`;
  then `num_extra_ids` (100) sentinels APPENDED after the SentencePiece model, at the top of the
  vocabulary in reverse: `<extra_id_0>` = vocab_size - 1, `<extra_id_99>` = sp_size.

So `vocab_size = sp_size + 100` (8,100 for the default 8,000-piece model; 32,100 for T5's own
`spiece.model`), and `model_vocab_size` rounds that up to a multiple of 128 for the embedding
(8,192; T5's 32,128). Ids in [vocab_size, model_vocab_size) are never produced by `encode`; a model
may still emit them before it is trained, and `decode` renders them as `<unused_N>`.

`load_or_train(...)` trains a unigram model on the training documents (lines sampled with a fixed
seed up to `max_sentences`, so training takes seconds), or loads an existing `spiece.model`.
A trained model is cached as `<workdir>/tokenizer/spm_<key>.model`, where `key` hashes the corpus
fingerprint and every training option: a different corpus or vocabulary never reuses a stale model.
Paths may be cloud URIs (`gs://...`, through etils.epath). In a multi-process job only process 0
trains and writes the model; the others wait for it (a barrier) and load it.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
import time
from typing import Iterable, Sequence

import jax
import numpy as np
import sentencepiece as spm

from t5like import paths
from t5like.data import corpus as corpus_lib

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
NUM_EXTRA_IDS = 100
MODEL_VOCAB_MULTIPLE = 128
_SENTINEL_RE = re.compile(r'<extra_id_(\d+)>')
_TRAINER_VERSION = 1  # bump when the training options below change


class TokenizerError(ValueError):
  """The tokenizer cannot be trained or loaded; the message names the path or setting."""


class Tokenizer:
  """T5-layout SentencePiece tokenizer: `encode`, `decode`, special ids and sentinels."""

  def __init__(self, model_proto: bytes, *, num_extra_ids: int = NUM_EXTRA_IDS, source: str = ''):
    self._proto = bytes(model_proto)
    self.source = source
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.num_extra_ids = num_extra_ids
    self.sp_size = self._sp.get_piece_size()
    for want, got, what in ((PAD_ID, self._sp.pad_id(), 'pad'), (EOS_ID, self._sp.eos_id(), 'eos'),
                            (UNK_ID, self._sp.unk_id(), 'unk')):
      if got != want:
        raise TokenizerError(f'SentencePiece model {source or "(in memory)"} has {what} id {got}; '
                             f"T5's layout needs {what} id {want}")

  @classmethod
  def from_file(cls, path: str, num_extra_ids: int = NUM_EXTRA_IDS) -> 'Tokenizer':
    try:
      proto = paths.resolve(path).read_bytes()
    except OSError as e:
      raise TokenizerError(f'cannot read SentencePiece model {path}: {e.strerror or e}; set '
                           "data.tokenizer to an existing spiece.model or '' to train one") from None
    try:
      return cls(proto, num_extra_ids=num_extra_ids, source=path)
    except TokenizerError:
      raise
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
      raise TokenizerError(f'{path} is not a SentencePiece model ({e})') from None

  def __getstate__(self):
    return {'proto': self._proto, 'num_extra_ids': self.num_extra_ids, 'source': self.source}

  def __setstate__(self, state):
    self.__init__(state['proto'], num_extra_ids=state['num_extra_ids'], source=state['source'])

  @property
  def model_proto(self) -> bytes:
    return self._proto

  @property
  def vocab_size(self) -> int:
    """SentencePiece pieces plus the appended sentinels."""
    return self.sp_size + self.num_extra_ids

  @property
  def model_vocab_size(self) -> int:
    """`vocab_size` rounded up to a multiple of 128: the model's embedding size."""
    m = MODEL_VOCAB_MULTIPLE
    return (self.vocab_size + m - 1) // m * m

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`: vocab_size - 1 - i (T5: the first sentinel is the highest id)."""
    if not 0 <= i < self.num_extra_ids:
      raise ValueError(f'sentinel index {i} out of range [0, {self.num_extra_ids})')
    return self.vocab_size - 1 - i

  def is_sentinel(self, token_id: int) -> bool:
    return self.sp_size <= token_id < self.vocab_size

  def encode(self, text: str) -> list[int]:
    """Ids of `text` (no EOS). `<extra_id_N>` written in the text becomes that sentinel id."""
    if not _SENTINEL_RE.search(text):
      return self._sp.encode(text, out_type=int)
    ids, pos = [], 0
    for m in _SENTINEL_RE.finditer(text):
      if m.start() > pos:
        ids.extend(self._sp.encode(text[pos:m.start()], out_type=int))
      ids.append(self.sentinel_id(int(m.group(1))))
      pos = m.end()
    if pos < len(text):
      ids.extend(self._sp.encode(text[pos:], out_type=int))
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if any(_SENTINEL_RE.search(t) for t in texts):
      return [self.encode(t) for t in texts]
    return self._sp.encode(list(texts), out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/EOS render as nothing, sentinels as `<extra_id_N>`."""
    out, run = [], []
    for t in (int(i) for i in ids):
      if 0 <= t < self.sp_size:
        run.append(t)
        continue
      if run:
        out.append(self._sp.decode(run))
        run = []
      out.append(self.special_text(t))
    if run:
      out.append(self._sp.decode(run))
    return ''.join(out)

  @functools.cached_property
  def piece_texts(self) -> 'PieceTexts':
    """What each SentencePiece id decodes to, from SentencePiece's own decoder (see PieceTexts)."""
    sp, n = self._sp, self.sp_size
    alone = sp.decode([[i] for i in range(n)])
    byte = [int(sp.id_to_piece(i)[3:5], 16) if sp.is_byte(i) else None for i in range(n)]
    anchor = next((i for i in range(n) if byte[i] is None and not sp.is_control(i)
                   and not sp.is_unknown(i) and alone[i].strip()), None)
    if anchor is None:
      raise TokenizerError(f'SentencePiece model {self.source or "(in memory)"} has no piece '
                           'that decodes to text')
    after = sp.decode([[anchor, i] for i in range(n)])
    appended = [t[len(alone[anchor]):] for t in after]
    return PieceTexts(alone, appended, byte)

  def special_text(self, token_id: int) -> str:
    """The text of an id above the SentencePiece model: a sentinel or an unused id."""
    if self.is_sentinel(token_id):
      return f'<extra_id_{self.vocab_size - 1 - token_id}>'
    if self.vocab_size <= token_id < self.model_vocab_size:
      return f'<unused_{token_id}>'
    raise ValueError(f'token id {token_id} is outside the vocabulary [0, {self.model_vocab_size})')

  def id_to_piece(self, token_id: int) -> str:
    if self.is_sentinel(token_id):
      return self.special_text(token_id)
    return self._sp.id_to_piece(int(token_id))


@dataclasses.dataclass(frozen=True)
class PieceTexts:
  """Per SentencePiece id: `alone`, its text decoded on its own (at the start of a text, where a
  leading '\u2581' is dropped); `appended`, the text it adds after text (the '\u2581' kept); `byte`,
  the byte value of a byte-fallback piece (else None), whose text depends on its neighbours."""
  alone: list[str]
  appended: list[str]
  byte: list[int | None]


def _utf8_length(lead: int) -> int:
  """Bytes of the UTF-8 sequence `lead` starts; 0 for a byte that cannot start one."""
  return 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else (
      4 if 0xF0 <= lead <= 0xF4 else 0)


class IncrementalDecoder:
  """`Tokenizer.decode` one token at a time, with no SentencePiece call per token.

  Follows SentencePiece's decoder: control pieces add nothing; a normal piece adds its `alone`
  text while its run (the ids since the last sentinel) has no text yet and its `appended` text
  after; consecutive byte pieces join into UTF-8, each byte that is not part of a valid sequence
  becoming U+FFFD. `add` returns the text that is final; bytes that may still complete a
  character wait for the next token (or `flush`)."""

  def __init__(self, tokenizer: Tokenizer):
    self.tok = tokenizer
    self._texts = tokenizer.piece_texts
    self._pending = bytearray()
    self._run_has_text = False

  def add(self, token_id: int) -> str:
    t = int(token_id)
    if not 0 <= t < self.tok.sp_size:
      out = self._bytes(final=True) + self.tok.special_text(t)
      self._run_has_text = False    # decode starts a new SentencePiece run after a sentinel
      return out
    b = self._texts.byte[t]
    if b is not None:
      self._pending.append(b)
      return self._bytes(final=False)
    out = self._bytes(final=True)
    text = (self._texts.appended if self._run_has_text else self._texts.alone)[t]
    self._run_has_text = self._run_has_text or bool(text)
    return out + text

  def flush(self) -> str:
    return self._bytes(final=True)

  def _bytes(self, final: bool) -> str:
    out, p = [], self._pending
    while p:
      n = _utf8_length(p[0])
      try:
        text, used = codecs.utf_8_decode(bytes(p[:n]), 'strict', False) if n else ('', -1)
      except UnicodeDecodeError:
        text, used = '', -1
      if used == 0 and not final and len(p) < n:
        break    # a valid start of a character: wait for its other bytes
      if used <= 0:
        text, used = '\ufffd', 1
      out.append(text)
      del p[:used]
    text = ''.join(out)
    self._run_has_text = self._run_has_text or bool(text)
    return text


def _training_lines(docs: Sequence[corpus_lib.Document], max_sentences: int, seed: int) -> list[str]:
  lines = [l.strip() for d in docs for l in d.text.splitlines()]
  lines = [l for l in lines if l]
  if len(lines) > max_sentences:
    keep = np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False)
    lines = [lines[i] for i in np.sort(keep)]
  return lines


def train_tokenizer(docs: Sequence[corpus_lib.Document], vocab_size: int, *,
                    max_sentences: int = 200_000, seed: int = 0,
                    num_threads: int = 2) -> Tokenizer:
  """Trains a unigram SentencePiece model (T5 ids, byte fallback) on the lines of `docs`.

  `vocab_size` counts SentencePiece pieces (pad, eos, unk, 256 bytes, learned pieces); the 100
  sentinels are appended on top (see the module docstring).
  """
  min_size = 3 + 256 + 1
  if vocab_size < min_size:
    raise TokenizerError(f'data.vocab_size={vocab_size} is too small: with byte fallback a '
                         f'SentencePiece model needs at least {min_size} pieces')
  lines = _training_lines(docs, max_sentences, seed)
  if not lines:
    raise TokenizerError('cannot train a tokenizer: the training documents have no text')
  model = io.BytesIO()
  t0 = time.time()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type='unigram', pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        byte_fallback=True, character_coverage=1.0, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    msg = str(e)
    hint = (' (the corpus is too small for this vocabulary: lower data.vocab_size)'
            if 'Vocabulary size' in msg or 'vocab_size' in msg else '')
    raise TokenizerError(f'SentencePiece training failed{hint}: {msg}') from None
  log.info('trained a %d-piece SentencePiece model on %d lines in %.1fs', vocab_size, len(lines),
           time.time() - t0)
  return Tokenizer(model.getvalue(), source='trained')


def cache_key(docs: Sequence[corpus_lib.Document], vocab_size: int, max_sentences: int,
              seed: int) -> str:
  spec = json.dumps({'corpus': corpus_lib.corpus_fingerprint(docs), 'vocab_size': vocab_size,
                     'max_sentences': max_sentences, 'seed': seed, 'version': _TRAINER_VERSION},
                    sort_keys=True)
  return hashlib.sha256(spec.encode()).hexdigest()[:16]


def load_or_train(train_docs: Sequence[corpus_lib.Document], workdir: str, *,
                  tokenizer_path: str = '', vocab_size: int = 8000,
                  max_sentences: int = 200_000, seed: int = 0) -> Tokenizer:
  """Loads `tokenizer_path` if given; else reuses or trains `<workdir>/tokenizer/spm_<key>.model`."""
  if tokenizer_path:
    return Tokenizer.from_file(tokenizer_path)
  key = cache_key(train_docs, vocab_size, max_sentences, seed)
  folder = paths.resolve(workdir) / 'tokenizer'
  path = folder / f'spm_{key}.model'
  if path.exists():
    log.info('reusing tokenizer %s', path)
    return Tokenizer.from_file(paths.as_str(path))
  if jax.process_index() == 0:   # one writer; the other processes wait below, then load it
    tok = train_tokenizer(train_docs, vocab_size, max_sentences=max_sentences, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(path, tok.model_proto)
    log.info('saved tokenizer %s', path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only multi-process jobs need the barrier
    multihost_utils.sync_global_devices(f'tokenizer {key}')
  return Tokenizer.from_file(paths.as_str(path))
