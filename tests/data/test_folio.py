"""folio_modernize alignment: a hand-checked sample, parsing rules, determinism, splits."""
import json
import os

import pytest

from t5like.data import folio

SAMPLE = os.path.join(os.path.dirname(__file__), 'folio_sample.json')


@pytest.fixture(scope='module')
def test_pairs():
  return {p: folio.play_pairs(p)[0] for p in folio.TEST_PLAYS}


def test_hand_checked_sample_is_aligned(test_pairs):
  # Each entry was checked by reading both files at the given line numbers: the Folio line(s)
  # and the modern line(s) are the same verse.
  with open(SAMPLE) as f:
    sample = json.load(f)
  assert len(sample) == 16
  for want in sample:
    got = [p for p in test_pairs[want['play']]
           if p.folio_lines == tuple(want['folio_lines'])]
    assert len(got) == 1, want
    assert got[0].modern_lines == tuple(want['modern_lines'])
    assert got[0].input == want['input'] and got[0].target == want['target']


def test_pairs_are_confident_and_short(test_pairs):
  for pairs in test_pairs.values():
    assert len(pairs) > 2000
    for p in pairs:
      assert p.similarity >= folio.MIN_SIMILARITY
      assert 1 <= len(p.folio_lines) <= folio.MAX_GROUP_LINES
      assert 1 <= len(p.modern_lines) <= folio.MAX_GROUP_LINES
      # Consecutive spoken lines (file line numbers may skip blank lines and directions).
      assert list(p.folio_lines) == sorted(set(p.folio_lines))
      assert p.folio_lines[-1] - p.folio_lines[0] < 4 * folio.MAX_GROUP_LINES
    # Monotone: the pairs follow both texts in order.
    firsts = [(p.folio_lines[0], p.modern_lines[0]) for p in pairs]
    assert firsts == sorted(firsts)
    assert all(b[1] > a[1] for a, b in zip(firsts, firsts[1:]))


def test_speakers_and_directions_removed_on_both_sides():
  f = folio.folio_lines('Actus Primus. Scoena Prima.\n\nEnter three Witches.\n\n'
                        '  1. When shall we three meet againe?\nIn Thunder, or in Raine?\n'
                        '  1 Cit. Soft, who comes heere?\n  Lady M. Out damned spot\nExeunt.\n')
  assert [l.text for l in f] == ['When shall we three meet againe?', 'In Thunder, or in Raine?',
                                 'Soft, who comes heere?', 'Out damned spot']
  m = folio.modern_lines('ACT I.\n\nSCENE I. A heath.\n\n[Enter three Witches.]\n\nFIRST WITCH.\n'
                         'When shall we three meet again? [Thunder]\n\nLADY MACBETH.\nOut, '
                         'damned spot!\n')
  assert [l.text for l in m] == ['When shall we three meet again?', 'Out, damned spot!']


def test_word_key_ignores_old_spelling():
  for old, new in (('Sunne', 'sun'), ('vpon', 'upon'), ('Iustice', 'justice'), ('haue', 'have'),
                   ('againe', 'again'), ('ayre', 'air')):
    assert folio.word_key(old) == folio.word_key(new), (old, new)
  assert folio.word_key('king') != folio.word_key('queen')


def test_alignment_is_deterministic_and_cached(tmp_path):
  a, sa = folio.align('macbeth', folio._read('macbeth_gut_f.txt'), folio._read('macbeth_gut.txt'))
  b, sb = folio.play_pairs('macbeth', str(tmp_path))
  c, sc = folio.play_pairs.__wrapped__('macbeth', str(tmp_path))  # read back from the file
  assert tuple(a) == b == c and sa == sb == sc
  assert len(list(tmp_path.glob('folio_macbeth_*.json'))) == 1
  assert sa.kept == len(a) and sa.groups == (sa.kept + sa.too_long + sa.not_contiguous
                                             + sa.low_coverage + sa.low_similarity)


def test_splits_are_disjoint_plays():
  plays = {s: set(folio.split_plays(s)) for s in folio.SPLITS}
  assert plays['test'] == {'macbeth', 'richard_ii'}
  assert not plays['test'] & plays['train'] and not plays['validation'] & plays['train']
  assert plays['train'] | plays['test'] | plays['validation'] == set(folio.FOLIO_TWINS)
  with pytest.raises(folio.FolioError, match='split'):
    folio.split_plays('dev')
  with pytest.raises(folio.FolioError, match='no First Folio twin'):
    folio.play_pairs('pericles')
