"""Task evaluation: decoding, scoring, rank classification, metrics and baselines."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import task_models
from t5like.data import objectives
from t5like.data.tasks import Registry, TaskError
from t5like.data.tasks import metrics
from t5like.infer import decode
from t5like.models import build_model
from t5like.train import evaluation

LENGTHS = {'encoder': 32, 'decoder': 12}


@pytest.fixture(scope='module')
def model():
  tok = task_models.tiny_tokenizer()
  cfg, params = task_models.tiny_model(tok)
  return cfg, params, tok


@pytest.fixture(scope='module')
def toy_registry(tmp_path_factory):
  d = tmp_path_factory.mktemp('toy')
  rows = [{'input': f'the king {w}', 'target': w} for w in ['hamlet', 'lear', 'macbeth'] * 4]
  for split in ('train', 'validation', 'test'):
    (d / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  spec = {'tasks': [
      {'name': 'toy_cls', 'source': {'type': 'folder', 'folder': str(d)}, 'prefix': 'which: ',
       'metrics': ['accuracy', 'macro_f1'], 'labels': ['hamlet', 'lear', 'macbeth']},
      {'name': 'toy_gen', 'source': {'type': 'folder', 'folder': str(d)}}]}
  (d / 'tasks.json').write_text(json.dumps(spec))
  return Registry([str(d / 'tasks.json')])


def test_generate_matches_decode_greedy_and_batching(model):
  cfg, params, tok = model
  texts = ['Vpon the Heath', 'When shall we three meet againe', 'Faire is foule', 'Exeunt']
  got = evaluation.generate(params, cfg, tok, texts, max_input_length=16, max_decode_length=8,
                            batch_size=3)
  rows = evaluation.encode_rows(tok, texts, 16, 'test')
  res = decode.greedy(params, cfg, jnp.asarray(rows), 8)
  want = []
  for row in np.asarray(res.tokens).tolist():
    want.append(tok.decode(row[:row.index(1)] if 1 in row else row))
  assert got == want
  assert evaluation.generate(params, cfg, tok, texts, max_input_length=16, max_decode_length=8,
                             batch_size=8) == got
  beams = evaluation.generate(params, cfg, tok, texts[:2], max_input_length=16,
                              max_decode_length=8, batch_size=2, method='beam', num_beams=2)
  assert len(beams) == 2
  with pytest.raises(TaskError, match='decode method'):
    evaluation.generate(params, cfg, tok, texts, max_input_length=16, max_decode_length=8,
                        method='topk')


def test_score_equals_teacher_forced_logprob(model):
  cfg, params, tok = model
  inputs, targets = ['Vpon the Heath', 'Thunder and Lightning'], ['Upon the heath.', 'Thunder']
  got = evaluation.score(params, cfg, tok, inputs, targets, lengths=LENGTHS, batch_size=4)
  model_ = build_model(cfg)
  for x, y, s in zip(inputs, targets, got):   # one example at a time, unpadded
    enc = jnp.asarray([tok.encode(x) + [1]])
    tgt = np.asarray(tok.encode(y) + [1])
    logits = model_.apply({'params': params}, enc, jnp.asarray([objectives.shift_right(tgt)]),
                          deterministic=True)
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    assert s == pytest.approx(float(jnp.sum(logp[jnp.arange(len(tgt)), tgt])), abs=1e-4)
  with pytest.raises(TaskError, match='pair up'):
    evaluation.score(params, cfg, tok, inputs, targets[:1], lengths=LENGTHS)


def test_rank_classification_is_argmax_of_scores(model):
  cfg, params, tok = model
  inputs = ['which: the king hamlet', 'which: the king lear', 'which: a storm']
  labels = ['hamlet', 'lear', 'macbeth']
  preds, scores = evaluation.rank_classify(params, cfg, tok, inputs, labels, lengths=LENGTHS,
                                           batch_size=4)
  for i, x in enumerate(inputs):
    each = evaluation.score(params, cfg, tok, [x] * 3, labels, lengths=LENGTHS)
    np.testing.assert_allclose(scores[i], each, atol=1e-4)
    assert preds[i] == labels[int(np.argmax(each))]


def test_evaluate_classification_task(model, toy_registry):
  cfg, params, tok = model
  task = toy_registry.get_task('toy_cls')
  res = evaluation.evaluate_task(params, cfg, tok, task, 'test', lengths=LENGTHS, batch_size=8,
                                 rank_classification=True, confidence=True, n_bootstrap=50)
  assert res['examples'] == 12 and set(res['metrics']) == {'accuracy', 'macro_f1'}
  preds = [p['prediction'] for p in res['predictions']]
  refs = [p['target'] for p in res['predictions']]
  assert res['metrics']['accuracy'] == metrics.exact_match(preds, refs)
  ranked = [p['rank_prediction'] for p in res['predictions']]
  assert set(ranked) <= set(task.labels)
  assert res['rank_metrics']['accuracy'] == metrics.exact_match(ranked, refs)
  # Majority of the training targets (a three-way tie: the smallest label) scores 1/3.
  assert res['baselines']['majority']['accuracy'] == pytest.approx(100 / 3)
  assert res['predictions'][0]['input'] == 'the king hamlet'   # raw input, without the prefix


def test_evaluate_generation_task_copy_baseline(model, toy_registry):
  cfg, params, tok = model
  res = evaluation.evaluate_task(params, cfg, tok, toy_registry.get_task('toy_gen'), 'test',
                                 lengths=LENGTHS, batch_size=8, max_examples=5)
  assert res['examples'] == 5 and set(res['metrics']) == {'bleu', 'chrf', 'exact_match'}
  copy = res['baselines']['copy']
  assert copy['exact_match'] == 0.0 and copy['chrf'] == pytest.approx(
      metrics.chrf([f'the king {w}' for w in ['hamlet', 'lear', 'macbeth', 'hamlet', 'lear']],
                   ['hamlet', 'lear', 'macbeth', 'hamlet', 'lear']))
  with pytest.raises(TaskError, match='rank classification needs'):
    evaluation.rank_classify(params, cfg, tok, ['a'], (), lengths=LENGTHS)


def test_read_jsonl_errors(tmp_path):
  p = tmp_path / 'in.jsonl'
  p.write_text('{"input": "a"}\n{"text": "b"}\n')
  with pytest.raises(TaskError, match=r"in.jsonl:2 has no string field 'input'"):
    evaluation.read_jsonl(str(p), ['input'])
  p.write_text('\n')
  with pytest.raises(TaskError, match='empty'):
    evaluation.read_jsonl(str(p), ['input'])
  with pytest.raises(TaskError, match='does not exist'):
    evaluation.read_jsonl(str(tmp_path / 'nope.jsonl'), ['input'])
