"""Distillation: KL / hard / sequence-level losses, the step through the trainer, and resumed runs
(in process, and after SIGKILL in a subprocess)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import (ConfigError, DataConfig, DistillConfig, OptimConfig, TrainConfig,
                           get_variant)
from t5like.compress import distill as D
from t5like.models import transformer
from t5like.train import loop
from t5like.train import step as step_lib


def _logits(seed, shape=(2, 3, 7), scale=2.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


def test_kl_is_zero_when_student_equals_teacher_and_matches_numpy():
  t = _logits(0)
  w = jnp.ones(t.shape[:2])
  for T in (1.0, 2.0, 4.0):
    assert abs(float(D.soft_target_loss(t, t, w, T))) < 1e-6
  s = _logits(1)
  T = 2.0
  pt = np.exp(np.asarray(t) / T); pt /= pt.sum(-1, keepdims=True)
  ps = np.exp(np.asarray(s) / T); ps /= ps.sum(-1, keepdims=True)
  ref = T ** 2 * np.mean(np.sum(pt * np.log(pt / ps), -1))
  np.testing.assert_allclose(D.soft_target_loss(s, t, w, T), ref, rtol=1e-5)
  assert float(D.soft_target_loss(s, t, w, T)) > 0


def test_kl_gradient_matches_finite_difference_and_teacher_gets_none():
  s, t = _logits(2, (1, 2, 5)), _logits(3, (1, 2, 5))
  w = jnp.array([[1.0, 0.5]])
  f = lambda x: D.soft_target_loss(x, t, w, 3.0)
  g = jax.grad(f)(s)
  eps = 1e-2
  fd = np.zeros(s.shape)
  for idx in np.ndindex(*s.shape):
    e = jnp.zeros(s.shape).at[idx].set(eps)
    fd[idx] = (float(f(s + e)) - float(f(s - e))) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=2e-2, atol=1e-4)
  # Analytic: d/ds T^2 KL = T (p_s - p_t) per token (times the normalised weight).
  analytic = 3.0 * (jax.nn.softmax(s / 3) - jax.nn.softmax(t / 3)) * (w / w.sum())[..., None]
  np.testing.assert_allclose(g, analytic, rtol=1e-4, atol=1e-6)
  gt = jax.grad(lambda x: D.soft_target_loss(s, x, w, 3.0))(t)
  np.testing.assert_array_equal(gt, np.zeros(t.shape))


def test_hard_targets_are_teacher_argmax():
  t, s = _logits(4), _logits(5)
  np.testing.assert_array_equal(D.hard_targets(t), np.argmax(np.asarray(t), -1))
  w = jnp.ones(t.shape[:2])
  np.testing.assert_allclose(D.hard_target_loss(s, t, w),
                             np.mean(D.token_ce_BT(s, jnp.argmax(t, -1))), rtol=1e-6)


def test_alpha_mixes_data_and_distillation_losses():
  t, s = _logits(6), _logits(7)
  batch = {'decoder_target_tokens': jnp.array([[1, 2, 3], [4, 5, 0]]),
           'decoder_loss_weights': jnp.array([[1., 1., 1.], [1., 1., 0.]])}
  W = 5.0  # the batch's loss weight: the trainer divides the sums by it
  for kind in ('soft', 'hard'):
    total, parts = D.distillation_sums(s, t, batch, DistillConfig(kind, alpha=0.25))
    np.testing.assert_allclose(total / W, 0.75 * parts['data_loss'] / W
                               + 0.25 * parts['distill_loss'] / W, rtol=1e-6)
  ce = D.token_ce_BT(s, batch['decoder_target_tokens'])
  np.testing.assert_allclose(parts['data_loss'] / W,
                             float(jnp.sum(ce * batch['decoder_loss_weights']) / 5), rtol=1e-6)
  np.testing.assert_allclose(parts['distill_loss'] / W,
                             D.hard_target_loss(s, t, batch['decoder_loss_weights']), rtol=1e-6)
  with pytest.raises(ConfigError, match='distill.kind'):
    DistillConfig('medium')


def _toy_batch(cfg, B=2, S=10, T=6):
  enc = jax.random.randint(jax.random.key(8), (B, S), 2, cfg.vocab_size)
  tgt = jax.random.randint(jax.random.key(9), (B, T), 2, cfg.vocab_size)
  dec = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec, 'decoder_target_tokens': tgt,
          'decoder_loss_weights': jnp.ones((B, T))}


def test_sequence_targets_are_teacher_greedy_outputs():
  from t5like.infer import decode
  cfg = get_variant('t5_tiny')
  params = transformer.init_params(cfg, jax.random.key(0))
  batch = _toy_batch(cfg)
  seq = D.sequence_targets(params, cfg, batch)
  out = decode.greedy(params, cfg, batch['encoder_input_tokens'], 6)
  np.testing.assert_array_equal(seq['decoder_target_tokens'], out.tokens)
  np.testing.assert_array_equal(seq['decoder_input_tokens'][:, 1:], out.tokens[:, :-1])
  np.testing.assert_array_equal(seq['decoder_loss_weights'].sum(1), out.lengths)
  np.testing.assert_array_equal(seq['encoder_input_tokens'], batch['encoder_input_tokens'])
  with pytest.raises(ConfigError, match='encoder-decoder'):
    D.sequence_targets(params, get_variant('decoder_tiny'), batch)


def test_distill_step_lowers_the_loss():
  from t5like.optim import make_optimizer
  from t5like.train.state import TrainState
  from t5like import precision
  cfg = get_variant('t5_tiny')
  teacher = transformer.init_params(cfg, jax.random.key(1))
  batch = _toy_batch(cfg)
  tx = make_optimizer(OptimConfig(name='adam', learning_rate=3e-3, schedule='constant', weight_decay=0.0,
                                  warmup_steps=0), None, 10)
  model = transformer.build_model(cfg)
  for kind in ('soft',):   # 'sequence' runs in the resume test below; 'hard' shares the step
    params = transformer.init_params(cfg, jax.random.key(2))
    state = TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), loss_scale=precision.NoOpLossScale())
    loss = D.distill_loss(DistillConfig(kind, alpha=0.7), cfg)
    step = jax.jit(lambda st, tp, b: step_lib.train_step(st, b, tp, model=model, tx=tx, loss=loss))
    losses = []
    for _ in range(4):
      state, m = step(state, teacher, batch)
      losses.append(float(m['distill_loss']))
    assert int(state.step) == 4
    assert losses[-1] < losses[0], (kind, losses)
    assert set(m) >= {'loss', 'data_loss', 'distill_loss', 'accuracy', 'grad_norm'}


def test_distill_grad_accumulation_equals_big_batch():
  # SGD: the update is linear in the gradient; 'sequence' rescales the teacher's token weights
  # over the whole batch, so the accumulated gradient equals the big-batch one.
  from t5like.optim import make_optimizer
  from t5like.train.state import TrainState
  from t5like import precision
  cfg = get_variant('t5_tiny')
  teacher = transformer.init_params(cfg, jax.random.key(1))
  batch = _toy_batch(cfg, B=4)
  batch['decoder_loss_weights'] = batch['decoder_loss_weights'].at[1, 3:].set(0.0)
  tx = make_optimizer(OptimConfig(name='sgd', learning_rate=0.1, schedule='constant',
                                  warmup_steps=0, weight_decay=0.0), None, 10)
  model = transformer.build_model(cfg)
  params = transformer.init_params(cfg, jax.random.key(2))
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0), loss_scale=precision.NoOpLossScale())
  loss = D.distill_loss(DistillConfig('sequence', alpha=0.5), cfg)
  out = {}
  for accum in (1, 2):
    out[accum] = jax.jit(lambda st, b, tp: step_lib.train_step(
        st, b, tp, model=model, tx=tx, loss=loss, grad_accum_steps=accum))(state, batch, teacher)
  (s1, m1), (s2, m2) = out[1], out[2]
  for k in ('loss', 'data_loss', 'distill_loss', 'grad_norm'):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _corpus(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  rng = np.random.default_rng(0)
  words = [''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), rng.integers(2, 8)))
           for _ in range(400)]
  for i in range(12):
    lines = [' '.join(rng.choice(words, 12)) + '.' for _ in range(30)]
    (corpus / f'doc{i}.txt').write_text('\n'.join(lines))
  return str(corpus)


@pytest.mark.slow
def test_distillation_run_resumes_from_checkpoint(tmp_path):
  model = get_variant('t5_tiny', vocab_size=512)
  data = DataConfig(corpus=_corpus(tmp_path), vocab_size=320, inputs_length=32, batch_size=8,
                    pack=False, validation_fraction=0.25)
  config = TrainConfig(model=model, data=data, num_steps=4, log_every=2, eval_every=4,
                       eval_batches=1, checkpoint_every=2, num_samples=0, async_checkpointing=False,
                       optim=OptimConfig(name='adam', learning_rate=1e-3, warmup_steps=0, weight_decay=0.0))
  teacher_cfg = model.replace(vocab_size=512)
  teacher = transformer.init_params(teacher_cfg, jax.random.key(5))
  technique = D.technique(DistillConfig('sequence', alpha=0.5), teacher, teacher_cfg)
  logs = []
  first = loop.train(config, str(tmp_path / 'run'), technique=technique, print_fn=logs.append)
  assert first['final_step'] == 4 and first['start_step'] == 0
  more = dataclasses.replace(config, num_steps=6)
  second = loop.train(more, str(tmp_path / 'run'), technique=technique, print_fn=logs.append)
  assert second['start_step'] == 4 and second['final_step'] == 6
  assert any('resumed from' in line for line in logs)
  assert [s for s, _ in second['evals']] == [0, 4, 6]
  assert os.path.exists(os.path.join(tmp_path, 'run', 'checkpoints', '6'))
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['distill'] == {'kind': 'sequence', 'alpha': 0.5, 'temperature': 2.0}
  with pytest.raises(ConfigError, match='data.pack=False'):
    loop.train(dataclasses.replace(config, data=dataclasses.replace(data, pack=True)),
               str(tmp_path / 'other'), technique=technique)


# A distillation run of 40 steps (checkpoints every 4), as a subprocess.
_DISTILL_RUN = textwrap.dedent("""
    import sys
    import jax
    from t5like.config import DataConfig, DistillConfig, OptimConfig, TrainConfig, get_variant
    from t5like.compress import distill
    from t5like.models import transformer
    from t5like.train import loop
    corpus, workdir, cache = sys.argv[1:]
    jax.config.update('jax_compilation_cache_dir', cache)   # the later runs skip compilation
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    model = get_variant('t5_tiny', vocab_size=512)
    config = TrainConfig(
        model=model, num_steps=40, log_every=4, eval_every=40, eval_batches=1,
        checkpoint_every=4, num_samples=0, seed=1,
        data=DataConfig(corpus=corpus, vocab_size=320, inputs_length=32, batch_size=8,
                        validation_fraction=0.25),
        optim=OptimConfig(name='adamw', learning_rate=3e-3, warmup_steps=4))
    teacher = transformer.init_params(model, jax.random.key(5))
    loop.train(config, workdir, technique=distill.technique(
        DistillConfig('soft', alpha=0.5), teacher, model))
""")


@pytest.mark.slow
def test_distillation_resumes_after_sigkill_like_training(tmp_path):
  corpus = _corpus(tmp_path)
  env = dict(os.environ, XLA_FLAGS='')   # one CPU device in the subprocess
  cmd = lambda wd: [sys.executable, '-c', _DISTILL_RUN, corpus, str(wd), str(tmp_path / 'cache')]
  full = tmp_path / 'full'
  r = subprocess.run(cmd(full), env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while (not (killed / 'checkpoints' / '8').exists() and proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, f'the run ended before it could be killed: {err[-3000:]}'
  assert not (killed / 'summary.json').exists()
  r = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from' in r.stdout
  ref, out = (json.loads((d / 'summary.json').read_text()) for d in (full, killed))
  assert out['start_step'] >= 8 and out['final_step'] == ref['final_step'] == 40
  assert abs(out['final_train_loss'] - ref['final_train_loss']) < 1e-5
  assert abs(out['final_val_loss'] - ref['final_val_loss']) < 1e-5
  rows = [json.loads(l) for l in (killed / 'metrics.jsonl').read_text().splitlines()]
  assert {'data_loss', 'distill_loss'} <= set(next(r for r in rows if r['split'] == 'train'))
