"""Hard and sequence-level distillation move the student toward the teacher's outputs.

On a fixed batch, a student trained through the trainer's step with the distillation loss only
(alpha = 1) comes to agree with the teacher: on the teacher's argmax tokens ('hard') or on the
teacher's greedy decodes ('sequence'). A control trained on the data targets only (alpha = 0)
does not: the agreement comes from the distillation loss, so a no-op loss fails the test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like import precision
from t5like.compress import distill as D
from t5like.config import DistillConfig, OptimConfig, get_variant
from t5like.infer import decode
from t5like.models import transformer
from t5like.optim import make_optimizer
from t5like.train import step as step_lib
from t5like.train.state import TrainState

STEPS = 40
B, S, T = 8, 12, 8


@pytest.fixture(scope='module')
def setup():
  # Untied output layer: with t5_tiny's tied embedding two random models' argmax mostly echoes
  # the decoder input, so students would agree with any teacher before training.
  cfg = get_variant('t5_1_1_tiny')
  teacher = transformer.init_params(cfg, jax.random.key(1))
  enc = jax.random.randint(jax.random.key(8), (B, S), 2, cfg.vocab_size)
  tgt = jax.random.randint(jax.random.key(9), (B, T), 2, cfg.vocab_size)
  dec = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), tgt[:, :-1]], 1)
  batch = {'encoder_input_tokens': enc, 'decoder_input_tokens': dec, 'decoder_target_tokens': tgt,
           'decoder_loss_weights': jnp.ones((B, T))}
  return cfg, teacher, batch


def train(cfg, teacher, batch, dcfg):
  tx = make_optimizer(OptimConfig(name='adam', learning_rate=1e-2, schedule='constant',
                                  weight_decay=0.0, warmup_steps=0), None, STEPS)
  model = transformer.build_model(cfg)
  params = transformer.init_params(cfg, jax.random.key(2))
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0), loss_scale=precision.NoOpLossScale())
  loss = D.distill_loss(dcfg, cfg)
  step = jax.jit(lambda st, tp, b: step_lib.train_step(st, b, tp, model=model, tx=tx, loss=loss))
  for _ in range(STEPS):
    state, _ = step(state, teacher, batch)
  return state.params


def logits(cfg, params, batch):
  return transformer.build_model(cfg).apply({'params': params}, batch['encoder_input_tokens'],
                                            batch['decoder_input_tokens'])


@pytest.mark.slow   # ~25 s of CPU: two short trainings
def test_hard_distillation_moves_the_student_to_the_teacher_argmax(setup):
  cfg, teacher, batch = setup
  want = np.asarray(D.hard_targets(logits(cfg, teacher, batch)))
  # The fixture varies: the teacher's argmax is not one token, nor the data targets.
  assert len(np.unique(want)) >= 8, want
  assert (want != np.asarray(batch['decoder_target_tokens'])).mean() > 0.9

  def agreement(params):
    return float((np.asarray(jnp.argmax(logits(cfg, params, batch), -1)) == want).mean())

  student0 = transformer.init_params(cfg, jax.random.key(2))
  distilled = train(cfg, teacher, batch, DistillConfig('hard', alpha=1.0))
  control = train(cfg, teacher, batch, DistillConfig('hard', alpha=0.0))
  a0, a1, ac = agreement(student0), agreement(distilled), agreement(control)
  assert a0 < 0.1, a0
  assert a1 > 0.9, (a0, a1)
  assert ac < 0.2, ac


@pytest.mark.slow
def test_sequence_distillation_moves_the_student_to_the_teacher_decodes(setup):
  cfg, teacher, batch = setup
  ref = decode.greedy(teacher, cfg, batch['encoder_input_tokens'], T)
  want, n = np.asarray(ref.tokens), np.asarray(ref.lengths)
  mask = np.arange(T)[None, :] < n[:, None]
  # The fixture varies: rows decode to different sequences of several tokens.
  assert mask.sum() >= 2 * B, n
  assert len({tuple(r[:k]) for r, k in zip(want, n)}) > B // 2, want

  def agreement(params):
    got = np.asarray(decode.greedy(params, cfg, batch['encoder_input_tokens'], T).tokens)
    return float((got == want)[mask].mean())

  student0 = transformer.init_params(cfg, jax.random.key(2))
  distilled = train(cfg, teacher, batch, DistillConfig('sequence', alpha=1.0))
  control = train(cfg, teacher, batch, DistillConfig('sequence', alpha=0.0))
  a0, a1, ac = agreement(student0), agreement(distilled), agreement(control)
  assert a0 < 0.1, a0
  assert a1 > 0.9, (a0, a1)
  assert ac < 0.2, ac
