"""Corpus reading, the Shakespeare selection, the stable split and bad-input errors."""
import configparser
import hashlib
import json
import logging
import os
import re

import pytest

from t5like.config import ConfigError, DataConfig
from t5like.data import corpus
from t5like.data.corpus import CorpusError, Document


def _gutenberg_work(url):
  """The work number in a Gutenberg url: 2ws3010.txt (modern) and 0ws3010.txt (folio) -> 'ws30'."""
  m = re.search(r'/\dws(\w\w)\d\d\.txt$', url)
  return m.group(1) if m else url


def test_shakespeare_uses_one_modern_version_of_each_work():
  docs = corpus.load_documents('shakespeare')
  names = [d.name for d in docs]
  assert len(docs) == 42
  assert 'metadata' not in names and not any(n.endswith('_f') for n in names)
  assert 'hamlet' in names and 'twelfth_night' in names and 'sonnets' in names
  assert all(len(d.text) > 1000 for d in docs)
  # Check against the package's own metadata: every selected file is the modern edition, every
  # First Folio file (whatever its name) is the twin of a selected work, and no work is twice.
  texts = corpus.shakespeare_dir()
  meta = configparser.ConfigParser(interpolation=None)
  meta.read_string((texts / 'metadata.txt').read_text(encoding='utf-8'))
  selected = {n + '_gut' for n in names}
  key = lambda s: (_gutenberg_work(meta[s]['url']),
                   re.sub(r'[^a-z]|^the', '', meta[s]['title'].lower()))
  for section in meta.sections():
    is_folio = 'folio' in meta[section].get('notes', '')
    assert (section in selected) == (not is_folio), section
    if is_folio:  # its modern twin (same Gutenberg number or same title) was selected
      twins = [s for s in selected if key(s)[0] == key(section)[0] or key(s)[1] == key(section)[1]]
      assert len(twins) == 1, (section, twins)
  assert len({key(s)[0] for s in selected}) == len(selected)


def test_shakespeare_split_is_deterministic_and_disjoint():
  docs = corpus.load_documents('shakespeare')
  train, val = corpus.split_documents(docs, 0.1, 0)
  train2, val2 = corpus.split_documents(list(reversed(docs)), 0.1, 0)
  assert {d.name for d in val} == {d.name for d in val2}
  assert len(val) == round(0.1 * 42) and len(train) + len(val) == 42
  assert not {d.name for d in train} & {d.name for d in val}
  _, val_other_seed = corpus.split_documents(docs, 0.1, 1)
  assert {d.name for d in val_other_seed} != {d.name for d in val}


def test_stable_hash_is_sha256_based():
  # A fixed value: a salted hash() would change between interpreter runs.
  assert corpus.stable_hash('0:hamlet') == 17933473225025015877
  assert corpus.stable_hash('x') == int.from_bytes(hashlib.sha256(b'x').digest()[:8], 'big')


def test_split_by_name_not_content_and_membership_stable():
  docs = [Document(f'doc{i}', f'text {i}') for i in range(50)]
  _, val = corpus.split_documents(docs, 0.2, 3)
  changed = [Document(d.name, d.text + ' more') for d in docs]
  _, val2 = corpus.split_documents(changed, 0.2, 3)
  assert [d.name for d in val] == [d.name for d in val2] and len(val) == 10


def test_split_needs_two_documents():
  with pytest.raises(CorpusError, match='at least 2'):
    corpus.split_documents([Document('a', 'x')], 0.1)


def test_folder_corpus_recurses_and_names_by_relative_path(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.txt').write_text('alpha text')
  (tmp_path / 'sub' / 'b.txt').write_text('beta text')
  (tmp_path / 'ignored.md').write_text('not a txt')
  docs = corpus.load_documents(str(tmp_path))
  assert [(d.name, d.text) for d in docs] == [('a.txt', 'alpha text'),
                                              (os.path.join('sub', 'b.txt'), 'beta text')]


def test_single_txt_file_is_split_into_documents(tmp_path):
  path = tmp_path / 'book.txt'
  paragraphs = [f'paragraph {i} ' + 'word ' * 200 for i in range(100)]
  path.write_text('\n\n'.join(paragraphs))
  docs = corpus.load_documents(str(path))
  assert len(docs) > 2 and docs[0].name == 'book.txt#0'
  assert '\n\n'.join(d.text for d in docs) == '\n\n'.join(paragraphs)


def test_jsonl_corpus_with_configured_field(tmp_path):
  path = tmp_path / 'c.jsonl'
  path.write_text('\n'.join(json.dumps({'body': f'line {i}', 'id': i}) for i in range(3)) + '\n')
  docs = corpus.load_documents(str(path), text_field='body')
  assert [d.text for d in docs] == ['line 0', 'line 1', 'line 2']
  assert docs[1].name == 'c.jsonl:2'
  with pytest.raises(CorpusError, match=r"c.jsonl:1 has no field 'text'.*data.text_field"):
    corpus.load_documents(str(path))


@pytest.mark.parametrize('content,match', [
    (b'', 'is empty'),
    (b'   \n\n', 'is empty'),
    (b'caf\xe9 au lait', r'not valid UTF-8 \(byte 3'),
    (b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR', 'not a text file'),
])
def test_bad_file_in_folder_errors_naming_it_or_is_skipped(tmp_path, content, match, caplog):
  (tmp_path / 'good.txt').write_text('some good text')
  bad = tmp_path / 'bad.txt'
  bad.write_bytes(content)
  with pytest.raises(CorpusError, match=match) as e:
    corpus.load_documents(str(tmp_path))
  assert str(bad) in str(e.value) and "on_bad_file='skip'" in str(e.value)
  with caplog.at_level(logging.WARNING):
    docs = corpus.load_documents(str(tmp_path), on_bad_file='skip')
  assert [d.name for d in docs] == ['good.txt']
  assert str(bad) in caplog.text


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root reads anything')
def test_unreadable_file_errors_naming_it(tmp_path):
  bad = tmp_path / 'secret.txt'
  bad.write_text('hidden')
  bad.chmod(0)
  try:
    with pytest.raises(CorpusError, match='cannot read corpus file .*secret.txt'):
      corpus.load_documents(str(bad))
  finally:
    bad.chmod(0o644)


def test_unreadable_file_is_reported_through_oserror(tmp_path, monkeypatch):
  path = tmp_path / 'a.txt'
  path.write_text('text')
  real_open = open

  def failing_open(p, *a, **k):
    if str(p) == str(path):
      raise PermissionError(13, 'Permission denied')
    return real_open(p, *a, **k)

  monkeypatch.setattr('builtins.open', failing_open)
  with pytest.raises(CorpusError, match=r'cannot read corpus file .*a.txt: Permission denied'):
    corpus.load_documents(str(tmp_path))


def test_all_files_skipped_is_still_an_error(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'')
  with pytest.raises(CorpusError, match='no usable documents'):
    corpus.load_documents(str(tmp_path), on_bad_file='skip')


def test_bad_jsonl_lines(tmp_path):
  path = tmp_path / 'c.jsonl'
  path.write_text('{"text": "ok"}\nnot json\n{"text": 3}\n{"text": "fine"}\n')
  with pytest.raises(CorpusError, match=r'c.jsonl:2 is not valid JSON'):
    corpus.load_documents(str(path))
  docs = corpus.load_documents(str(path), on_bad_file='skip')
  assert [d.text for d in docs] == ['ok', 'fine']


@pytest.mark.parametrize('make,match', [
    (lambda p: str(p / 'missing'), 'does not exist'),
    (lambda p: str(p), 'has no .txt files'),
    (lambda p: (p / 'x.png').write_bytes(b'\x89PNG') and str(p / 'x.png'), 'neither .txt nor .jsonl'),
    (lambda p: '', 'data.corpus is empty'),
])
def test_bad_corpus_paths(tmp_path, make, match):
  with pytest.raises(CorpusError, match=match):
    corpus.load_documents(make(tmp_path))


def test_data_config_validates_policy_and_objective():
  with pytest.raises(ConfigError, match="data.on_bad_file='ignore'.*'error', 'skip'"):
    DataConfig(on_bad_file='ignore')
  with pytest.raises(ConfigError, match='data.objective'):
    DataConfig(objective='mlm')
  with pytest.raises(ConfigError, match='data.mask_prob'):
    DataConfig(mask_prob=1.5)
