"""Tokenizer: T5 id layout, sentinels, byte fallback, caching, loading."""
import os
import pickle

import numpy as np
import pytest

from t5like.data import corpus
from t5like.data import tokenizer as tokenizer_lib
from t5like.data.tokenizer import Tokenizer, TokenizerError

from tests.data.conftest import TINY_VOCAB


def test_t5_id_layout(tiny_tokenizer):
  tok = tiny_tokenizer
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  assert [tok.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  assert tok.sp_size == TINY_VOCAB and tok.vocab_size == TINY_VOCAB + 100
  assert tok.sentinel_id(0) == tok.vocab_size - 1 and tok.sentinel_id(99) == tok.sp_size
  assert tok.id_to_piece(tok.sentinel_id(7)) == '<extra_id_7>'
  assert tok.model_vocab_size % 128 == 0
  assert tok.vocab_size <= tok.model_vocab_size < tok.vocab_size + 128
  with pytest.raises(ValueError, match='sentinel index 100'):
    tok.sentinel_id(100)


def test_encode_decode_round_trip_and_byte_fallback(tiny_tokenizer):
  tok = tiny_tokenizer
  text = 'To be, or not to be: that is the question.'
  ids = tok.encode(text)
  assert ids and all(3 <= i < tok.sp_size for i in ids) and tok.eos_id not in ids
  assert tok.decode(ids) == text
  rare = 'snow ☃ man'  # not in the training text: bytes, not <unk>
  ids = tok.encode(rare)
  assert tok.unk_id not in ids and tok.decode(ids) == rare


def test_sentinels_in_text_and_decode(tiny_tokenizer):
  tok = tiny_tokenizer
  ids = tok.encode('a <extra_id_0> b<extra_id_1>')
  assert tok.sentinel_id(0) in ids and ids[-1] == tok.sentinel_id(1)
  assert tok.decode([tok.sentinel_id(3)] + tok.encode('x')) == '<extra_id_3>x'
  assert tok.decode([tok.eos_id, tok.pad_id]) == ''
  assert tok.decode([tok.vocab_size]) == f'<unused_{tok.vocab_size}>'
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok.decode([tok.model_vocab_size])


def test_pickle_round_trip(tiny_tokenizer):
  tok = pickle.loads(pickle.dumps(tiny_tokenizer))
  assert tok.encode('hello world') == tiny_tokenizer.encode('hello world')
  assert tok.vocab_size == tiny_tokenizer.vocab_size


def test_training_is_deterministic(tiny_corpus_dir, tiny_tokenizer):
  docs = corpus.load_documents(str(tiny_corpus_dir))
  again = tokenizer_lib.train_tokenizer(docs, TINY_VOCAB)
  assert again.model_proto == tiny_tokenizer.model_proto


def test_cache_is_reused_and_keyed_by_corpus_and_vocab(tmp_path, tiny_corpus_dir):
  docs = corpus.load_documents(str(tiny_corpus_dir))[:4]
  workdir = str(tmp_path)
  first = tokenizer_lib.load_or_train(docs, workdir, vocab_size=400)
  files = os.listdir(tmp_path / 'tokenizer')
  assert len(files) == 1 and files[0].startswith('spm_') and files[0].endswith('.model')
  path = tmp_path / 'tokenizer' / files[0]
  mtime = path.stat().st_mtime_ns
  second = tokenizer_lib.load_or_train(docs, workdir, vocab_size=400)
  assert path.stat().st_mtime_ns == mtime and second.model_proto == first.model_proto
  tokenizer_lib.load_or_train(docs, workdir, vocab_size=420)
  changed = docs[:3] + [corpus.Document(docs[3].name, docs[3].text + '\nA new line.')]
  tokenizer_lib.load_or_train(changed, workdir, vocab_size=400)
  assert len(os.listdir(tmp_path / 'tokenizer')) == 3


def test_load_existing_model(tmp_path, tiny_tokenizer):
  path = tmp_path / 'spiece.model'
  path.write_bytes(tiny_tokenizer.model_proto)
  tok = tokenizer_lib.load_or_train([], str(tmp_path / 'wd'), tokenizer_path=str(path))
  assert tok.encode('the king') == tiny_tokenizer.encode('the king')
  assert not (tmp_path / 'wd').exists()


def test_load_errors(tmp_path):
  with pytest.raises(TokenizerError, match='cannot read SentencePiece model .*nope.model'):
    Tokenizer.from_file(str(tmp_path / 'nope.model'))
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'definitely not a protobuf')
  with pytest.raises(TokenizerError, match='bad.model is not a SentencePiece model'):
    Tokenizer.from_file(str(bad))


def test_training_errors(tiny_corpus_dir):
  docs = corpus.load_documents(str(tiny_corpus_dir))[:1]
  with pytest.raises(TokenizerError, match='too small'):
    tokenizer_lib.train_tokenizer(docs, 100)
  with pytest.raises(TokenizerError, match='lower data.vocab_size'):
    tokenizer_lib.train_tokenizer([corpus.Document('a', 'tiny text only')], 5000)


@pytest.mark.slow
def test_shakespeare_default_tokenizer_trains_quickly(tmp_path):
  import time
  train, _ = corpus.split_documents(corpus.load_documents('shakespeare'), 0.1, 0)
  t0 = time.time()
  tok = tokenizer_lib.load_or_train(train, str(tmp_path), vocab_size=8000)
  assert time.time() - t0 < 90
  assert (tok.sp_size, tok.vocab_size, tok.model_vocab_size) == (8000, 8100, 8192)
  assert tok.sentinel_id(0) == 8099
  assert tok.decode(tok.encode('Now is the winter of our discontent')) == \
      'Now is the winter of our discontent'


def _incremental(tok, ids) -> str:
  dec = tokenizer_lib.IncrementalDecoder(tok)
  return ''.join(dec.add(t) for t in ids) + dec.flush()


def test_incremental_decoder_matches_sentencepiece_on_every_byte_pair(tiny_tokenizer):
  """Every pair of byte pieces (valid, cut and invalid UTF-8 alike), alone and after text."""
  tok = tiny_tokenizer
  byte_id = {b: i for i, b in enumerate(tok.piece_texts.byte) if b is not None}
  assert len(byte_id) == 256
  word = tok.encode('the')
  for x in range(256):
    for y in range(256):
      ids = [byte_id[x], byte_id[y]]
      assert _incremental(tok, ids) == tok.decode(ids), (x, y)
    ids = word + [byte_id[x], *word]
    assert _incremental(tok, ids) == tok.decode(ids), x


def test_incremental_decoder_matches_decode_on_mixed_ids(tiny_tokenizer):
  """Random runs of every kind: normal, space-only, control and unknown pieces, bytes of valid
  and cut multi-byte characters, random bytes, sentinels and unused ids."""
  tok = tiny_tokenizer
  texts = tok.piece_texts
  pieces = [i for i in range(tok.sp_size) if texts.byte[i] is None]
  spaces = [i for i in pieces if texts.alone[i] == '' and texts.appended[i].strip(' ') == '']
  bytes_ = [i for i in range(tok.sp_size) if texts.byte[i] is not None]
  assert spaces and {tok.pad_id, tok.eos_id} <= set(pieces)
  specials = list(range(tok.sp_size, tok.model_vocab_size))
  assert tok.model_vocab_size > tok.vocab_size   # unused ids are in the mix too
  utf8 = tok.encode('日本語 🙂 naïve Café')
  rng = np.random.default_rng(0)
  for _ in range(2000):
    ids = []
    for _ in range(int(rng.integers(1, 20))):
      kind = int(rng.integers(5))
      if kind == 4:
        a = int(rng.integers(len(utf8)))
        ids += utf8[a:a + int(rng.integers(1, 6))]
      else:
        ids.append(int(rng.choice((pieces, spaces, bytes_, specials)[kind])))
    assert _incremental(tok, ids) == tok.decode(ids), ids
  text = corpus.shakespeare_documents()[0].text[:5000]
  ids = tok.encode(text)
  assert _incremental(tok, ids) == tok.decode(ids)


def test_incremental_decoder_rejects_ids_outside_the_model(tiny_tokenizer):
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tokenizer_lib.IncrementalDecoder(tiny_tokenizer).add(tiny_tokenizer.model_vocab_size)
