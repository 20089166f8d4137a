"""The compression study: end to end on a tiny model and a toy task, and its building blocks."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.compress import distill as D
from t5like.compress import prune, study, study_measure, study_report, study_spec, surgery
from t5like.config import get_variant
from t5like.data import corpus
from t5like.data import tokenizer as tokenizer_lib
from t5like.models import init_params
from t5like.serve import bundle
from prune_testutil import forward, random_params

WORDS = 'the king queen lord night day love death sword crown heart blood'.split()


@pytest.fixture(scope='module')
def toy_study(tmp_path_factory):
  """A toy task (lower-case the odd words) and a t5_tiny teacher bundle with its tokenizer."""
  root = tmp_path_factory.mktemp('study')
  rng = np.random.default_rng(0)
  for split, n in (('train', 200), ('dev', 16), ('test', 16)):
    with open(root / f'{split}.jsonl', 'w') as f:
      for _ in range(n):
        w = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(2, 6))]
        src = ' '.join(x.capitalize() if i % 2 else x for i, x in enumerate(w))
        f.write(json.dumps({'input': src, 'target': ' '.join(w)}) + '\n')
  (root / 'tasks.json').write_text(json.dumps({'tasks': [{
      'name': 'toy', 'prefix': 'lower: ', 'source': {
          'type': 'jsonl', 'train': 'train.jsonl', 'validation': 'dev.jsonl',
          'test': 'test.jsonl'}}]}))
  tok = tokenizer_lib.train_tokenizer(corpus.shakespeare_documents()[:2], 400, max_sentences=2000)
  cfg = get_variant('t5_1_1_tiny')          # untied output layer: embedding tying applies
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  teacher = bundle.export_bundle(params, cfg, tok, str(root / 'teacher'))
  return root, teacher


def _config(root, teacher, **kw):
  return study_spec.StudyConfig(
      task='toy', task_files=(str(root / 'tasks.json'),), teacher=teacher, teacher_step='latest',
      batch_size=8, inputs_length=32, targets_length=32, finetune_steps=2,
      calibration_batches=1, test_examples=12, eval_batch_size=4, validation_batches=1,
      timing_rounds=1, n_bootstrap=20, serve=False, **kw)


def _numbers(text):
  return re.findall(r'[-+]?\d[\d,]*\.?\d*', text)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _leaves(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield float(tree)


def _check_report_numbers(report: str, results: dict):
  """Every number in the table's rows is a JSON value of that variant, rounded as printed."""
  rows = [line for line in report.splitlines() if re.match(r'\| \d+ \|', line)]
  assert rows
  for line in rows:
    cells = [c.strip() for c in line.strip('|').split('|')]
    name = cells[1]
    values = list(_leaves(results['variants'][name]))
    for cell in cells[2:]:
      for num in _numbers(cell):
        decimals = len(num.split('.')[1]) if '.' in num else 0
        x = float(num.replace(',', ''))
        assert any(round(v, decimals) == x or abs(round(v, decimals) - x) < 10 ** -decimals / 2
                   for v in values), (name, cell, num)


@pytest.mark.slow
def test_study_end_to_end_every_variant(toy_study, tmp_path):
  root, teacher = toy_study
  cfg = _config(root, teacher)
  s = study.Study(cfg, str(tmp_path / 'out'), str(tmp_path / 'work'),
                  save_fn=bundle.export_bundle, command='pytest', print_fn=lambda _: None)
  results = s.run()
  names = {v.name for v in study_spec.variants(cfg)}
  assert set(results['variants']) == names
  for name, rec in results['variants'].items():
    assert 'test' in rec, name
    assert {'chrf', 'bleu', 'exact_match'} <= set(rec['test'])
    assert rec['tokens_per_s_b1'] > 0 and rec['tokens_per_s_b8'] > 0, name
    assert rec['weight_bytes'] > 0 and rec['params'] > 0
    if name != 'teacher':
      assert set(rec['vs_teacher']) == {'chrf', 'bleu', 'exact_match'}
  v = results['variants']
  t = v['teacher']
  assert v['int8']['weight_bytes'] < t['weight_bytes'] / 3
  assert v['int4']['weight_bytes'] < v['int8']['weight_bytes']
  assert v['prune_structured_70']['params'] < v['prune_structured_30']['params'] < t['params']
  assert v['student_b_soft']['params'] < v['student_a_soft']['params'] < t['params']
  assert v['share_layers']['params'] < t['params']
  assert v['tie_embeddings']['params'] < t['params']
  assert v['student_a_pruned_int8']['weight_bytes'] < v['student_a_soft']['weight_bytes'] / 3
  assert v['control']['extra_steps'] == 2 and v['student_a_pruned_int8']['extra_steps'] == 4
  assert abs(v['prune_magnitude_50']['sparsity'] - 0.5) < 0.01
  assert v['prune_nm_1of4']['sparsity'] == pytest.approx(0.75, abs=0.01)
  report = (tmp_path / 'out' / 'report.md').read_text()
  assert 'pytest' in report
  _check_report_numbers(report, json.loads((tmp_path / 'out' / 'results.json').read_text()))
  for f in ('quality_vs_bytes.png', 'quality_vs_speed.png'):
    assert (tmp_path / 'out' / f).stat().st_size > 10_000


def test_study_resumes_and_skips_recorded_variants(toy_study, tmp_path):
  root, teacher = toy_study
  cfg = _config(root, teacher, only=('int8', 'dynamic_ffn_5*'))
  make = lambda c: study.Study(c, str(tmp_path / 'out'), str(tmp_path / 'work'),
                               save_fn=bundle.export_bundle, print_fn=lambda _: None)
  first = make(cfg).run()
  assert set(first['variants']) == {'teacher', 'int8', 'dynamic_ffn_50'}
  assert first['variants']['dynamic_ffn_50']['ffn_topk'] == 64
  report = (tmp_path / 'out' / 'report.md').read_text()
  _check_report_numbers(report, first)
  # A rerun with one more variant builds only that one; the others keep their numbers.
  again = make(dataclasses.replace(cfg, only=cfg.only + ('control',))).run()
  for name in ('int8', 'dynamic_ffn_50'):
    assert again['variants'][name]['technique_s'] == first['variants'][name]['technique_s']
    assert again['variants'][name]['test'] == first['variants'][name]['test']
  assert 'test' in again['variants']['control']
  assert again['variants']['control']['extra_steps'] == 2


def test_dynamic_runner_gets_its_own_program(toy_study):
  _, teacher = toy_study
  from t5like.train import init_from
  pre = init_from.load_pretrained(teacher)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 400, (2, 8)), jnp.int32)
  dense = study_measure.Runner('teacher', pre.params, pre.cfg)
  sparse = study_measure.Runner('dyn', pre.params, pre.cfg, ffn_topk=4)
  full = study_measure.Runner('dyn_full', pre.params, pre.cfg, ffn_topk=pre.cfg.d_ff)
  a = np.asarray(dense.greedy(x, 6, stop_at_eos=False).scores)
  b = np.asarray(sparse.greedy(x, 6, stop_at_eos=False).scores)
  c = np.asarray(full.greedy(x, 6, stop_at_eos=False).scores)
  np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)   # k = d_ff is the dense model
  assert not np.allclose(b, a, atol=1e-3)                 # top-4 of 128 changes the scores
  # ... and the dense runner still decodes densely after the sparse one was traced.
  np.testing.assert_allclose(np.asarray(dense.greedy(x, 6, stop_at_eos=False).scores), a)


def test_drop_layers_keeps_every_other_layer():
  cfg = get_variant('t5_1_1_tiny', num_encoder_layers=4, num_decoder_layers=4)
  params = random_params(cfg)
  small, scfg = study.drop_layers(params, cfg, 2)
  assert (scfg.num_encoder_layers, scfg.num_decoder_layers) == (2, 2)
  k = params['encoder']['stack']['layers']['layer']['mlp']['wo']['kernel']
  np.testing.assert_array_equal(small['encoder']['stack']['layers']['layer']['mlp']['wo']['kernel'],
                                k[np.array([0, 2])])
  np.testing.assert_array_equal(small['shared_embedding']['embedding'],
                                params['shared_embedding']['embedding'])
  with pytest.raises(Exception, match='must divide'):
    study.drop_layers(params, cfg, 3)


def test_surgery_with_nothing_pruned_is_the_same_model():
  cfg = get_variant('t5_tiny')
  params = random_params(cfg)
  same, same_cfg, report = surgery.shrink(params, prune.ones_masks(params), cfg)
  assert (same_cfg.num_heads, same_cfg.d_ff) == (cfg.num_heads, cfg.d_ff)
  assert report['padded_heads'] == report['padded_neurons'] == 0
  tok = jax.random.randint(jax.random.key(3), (2, 7), 2, cfg.vocab_size)
  np.testing.assert_array_equal(forward(same_cfg)(same, tok), forward(cfg)(params, tok))


def test_hard_and_soft_losses_match_their_closed_forms():
  s = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 5)) * 2)
  t = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 5)) * 2)
  w = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]])
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  # hard: sum_w -log p_s[argmax t] / sum w
  ce = -np.take_along_axis(log_softmax(s), t.argmax(-1)[..., None], -1)[..., 0]
  np.testing.assert_allclose(D.hard_target_loss(s, t, w), (ce * w).sum() / w.sum(), rtol=1e-5)
  # soft at T = 1: KL(p_t || p_s) = cross-entropy(p_t, p_s) - entropy(p_t)
  pt = np.exp(log_softmax(t))
  kl = (-(pt * log_softmax(s)).sum(-1)) - (-(pt * log_softmax(t)).sum(-1))
  np.testing.assert_allclose(D.soft_target_loss(s, t, w, 1.0), (kl * w).sum() / w.sum(),
                             rtol=1e-5)


def test_pareto_frontier():
  pts = [(1.0, 10.0), (2.0, 12.0), (3.0, 11.0), (0.5, 5.0), (2.0, 9.0)]
  assert study_report.pareto(pts, higher_x_better=False) == [3, 0, 1]
  assert study_report.pareto(pts, higher_x_better=True) == [1, 2]


def test_study_config_errors_name_the_field():
  with pytest.raises(Exception, match='study.sparsities'):
    study_spec.StudyConfig(sparsities=(0.5,))
  with pytest.raises(Exception, match='study.only'):
    study_spec.selected(study_spec.StudyConfig(only=('nonexistent',)))
