"""Knowledge distillation: soft, hard and sequence-level targets, as a loss for the trainer.

Shape letters: B batch, T target length, S source length, V vocab.

Losses (token-weighted over `decoder_loss_weights`; the teacher under stop_gradient):
- 'soft': T^2 * KL(softmax(teacher / T) || softmax(student / T)) (the T^2 keeps the gradient
  scale independent of the temperature T);
- 'hard': cross-entropy of the student on the teacher's argmax tokens;
- 'sequence': the teacher's greedy decode of each encoder input becomes the target sequence and the
  student is trained on it with cross-entropy (sequence-level distillation;
  `t5like.infer.decode.greedy`).
The training loss is `(1 - alpha) * data CE + alpha * distillation loss`; the data CE takes the
run's label smoothing and z-loss.

The student trains through the one trainer: `technique(dcfg, teacher_params, teacher_cfg)` is a
`t5like.train.loop.Technique` whose loss is `distill_loss` and whose extra step input is the
teacher's params (sharded like a model's), so

  loop.train(config, workdir, technique=distill.technique(dcfg, teacher_params, teacher_cfg))

has the trainer's meshes (pipeline ones included), gradient accumulation, schedules, checkpoints
(with the distillation settings under 'distill' in the saved config), SIGTERM saves and resume.

Written here because no maintained JAX library provides these losses for linen pytrees.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from t5like.config import ConfigError, DistillConfig, ModelConfig, TrainConfig
from t5like.infer import decode
from t5like.models import build_model
from t5like.train import loop
from t5like.train import state as state_lib
from t5like.train import step as step_lib

# Prefix of the batch keys that hold the teacher's sequences ('sequence' distillation).
SEQ = 'teacher_'
_DECODER_KEYS = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')


# ----------------------------------------------------------------------------- losses

def _weighted_mean(x_BT, weights_BT):
  w = weights_BT.astype(jnp.float32)
  return jnp.sum(x_BT * w) / jnp.maximum(jnp.sum(w), 1.0)


def soft_kl_BT(student_BTV, teacher_BTV, temperature: float = 1.0):
  """Per-token T^2 * KL(teacher_T || student_T) [B, T], the teacher under stop_gradient."""
  t = jax.lax.stop_gradient(teacher_BTV.astype(jnp.float32)) / temperature
  s = student_BTV.astype(jnp.float32) / temperature
  log_pt, log_ps = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
  return temperature ** 2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def soft_target_loss(student_BTV, teacher_BTV, weights_BT, temperature: float = 1.0):
  """Soft targets: weighted mean of T^2 * KL(teacher_T || student_T)."""
  return _weighted_mean(soft_kl_BT(student_BTV, teacher_BTV, temperature), weights_BT)


def token_ce_BT(logits_BTV, targets_BT):
  """Per-token cross-entropy [B, T]."""
  logits = logits_BTV.astype(jnp.float32)
  tgt = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - tgt


def hard_targets(teacher_BTV):
  """The teacher's argmax tokens [B, T] (int32, no gradient)."""
  return jnp.argmax(jax.lax.stop_gradient(teacher_BTV), axis=-1).astype(jnp.int32)


def hard_target_loss(student_BTV, teacher_BTV, weights_BT):
  """Weighted mean cross-entropy of the student on the teacher's argmax."""
  return _weighted_mean(token_ce_BT(student_BTV, hard_targets(teacher_BTV)), weights_BT)


def sequence_targets(teacher_params, teacher_cfg: ModelConfig, batch: Mapping[str, jax.Array],
                     start_id: int | None = None) -> dict[str, jax.Array]:
  """Sequence-level targets: the batch with the teacher's greedy outputs as decoder targets.

  Encoder-decoder and unpacked batches only (one example a row): each row's encoder input is
  decoded for T tokens (T of the batch); targets are the decoded tokens up to and including EOS.
  """
  if not teacher_cfg.is_encdec:
    raise ConfigError('sequence-level distillation needs an encoder-decoder teacher; '
                      f'{teacher_cfg.name!r} is decoder-only (use kind soft or hard)')
  enc = batch['encoder_input_tokens']
  T = batch['decoder_target_tokens'].shape[1]
  out = decode.greedy(jax.lax.stop_gradient(teacher_params), teacher_cfg, enc, T)
  tokens_BT = jax.lax.stop_gradient(out.tokens)
  weights_BT = (jnp.arange(T)[None, :] < out.lengths[:, None]).astype(jnp.float32)
  start = teacher_cfg.decoder_start_id if start_id is None else start_id
  inputs_BT = jnp.concatenate([jnp.full_like(tokens_BT[:, :1], start), tokens_BT[:, :-1]], axis=1)
  new = {k: v for k, v in batch.items() if not k.startswith('decoder_')}
  new.update(decoder_input_tokens=inputs_BT, decoder_target_tokens=tokens_BT,
             decoder_loss_weights=weights_BT)
  return new


def distillation_sums(student_BTV, teacher_BTV, batch: Mapping[str, jax.Array],
                      dcfg: DistillConfig, student_seq_BTV=None, seq_batch=None, *,
                      label_smoothing: float = 0.0, z_loss: float = 0.0):
  """(objective, {'loss', 'data_loss', 'distill_loss', 'z_loss', 'accuracy'}) as sums over the
  batch's weighted target tokens (`t5like.train.step.Loss`); divided by the batch's loss weight
  they are the means of the module docstring.

  For 'sequence', `student_seq_BTV` are the student's logits on `seq_batch` (the teacher's
  outputs as targets, with loss weights that sum to the batch's: see `distill_loss`);
  `teacher_BTV` is unused.
  """
  w = step_lib.loss_weights(batch)
  data, zl, correct = step_lib.cross_entropy_sums(student_BTV, batch['decoder_target_tokens'], w,
                                                  label_smoothing, z_loss)
  if dcfg.alpha == 0:
    dist = jnp.zeros([], jnp.float32)
  elif dcfg.kind == 'soft':
    dist = jnp.sum(soft_kl_BT(student_BTV, teacher_BTV, dcfg.temperature) * w)
  elif dcfg.kind == 'hard':
    dist = jnp.sum(token_ce_BT(student_BTV, hard_targets(teacher_BTV)) * w)
  else:
    if student_seq_BTV is None or seq_batch is None:
      raise ValueError("kind='sequence' needs the student's logits on the teacher's sequences")
    dist = jnp.sum(token_ce_BT(student_seq_BTV, seq_batch['decoder_target_tokens'])
                   * seq_batch['decoder_loss_weights'])
  loss = (1.0 - dcfg.alpha) * data + dcfg.alpha * dist
  return loss + (1.0 - dcfg.alpha) * zl, {'loss': loss, 'data_loss': data, 'distill_loss': dist,
                                          'z_loss': zl, 'accuracy': correct}


def distill_loss(dcfg: DistillConfig, teacher_cfg: ModelConfig, *, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> step_lib.Loss:
  """The trainer's `Loss` for distillation; the step's extra input is the teacher's params.

  'soft' / 'hard' run the teacher on each (micro)batch inside the loss. 'sequence' decodes the
  whole batch once per step (`prepare`) and adds the teacher's sequences under 'teacher_*' keys,
  their loss weights rescaled so that they sum to the batch's: the step's one normaliser then
  gives the mean over the teacher's tokens, exactly, under gradient accumulation too.
  """
  teacher_model = build_model(teacher_cfg)

  def prepare(batch, teacher_params):
    seq = sequence_targets(teacher_params, teacher_cfg, batch)
    w_seq = seq['decoder_loss_weights']
    scale = (jnp.maximum(jnp.sum(step_lib.loss_weights(batch)), 1.0)
             / jnp.maximum(jnp.sum(w_seq), 1.0))
    return {**batch, **{SEQ + k: seq[k] for k in _DECODER_KEYS},
            SEQ + 'decoder_loss_weights': w_seq * scale}

  def fn(model, params, batch, rng, teacher_params):
    rng_a, rng_b = jax.random.split(rng)
    logits = step_lib.apply_model(model, params, batch, deterministic=False, rng=rng_a)
    teacher_BTV = seq_logits = seq_batch = None
    if dcfg.kind == 'sequence':
      seq_batch = {k: v for k, v in batch.items() if not k.startswith(('decoder_', SEQ))}
      seq_batch.update({k: batch[SEQ + k] for k in _DECODER_KEYS})
      seq_logits = step_lib.apply_model(model, params, seq_batch, deterministic=False, rng=rng_b)
    elif dcfg.alpha > 0:
      teacher_BTV = jax.lax.stop_gradient(step_lib.apply_model(
          teacher_model, jax.lax.stop_gradient(teacher_params), batch, deterministic=True))
    return distillation_sums(logits, teacher_BTV, batch, dcfg, seq_logits, seq_batch,
                             label_smoothing=label_smoothing, z_loss=z_loss)

  return step_lib.Loss(fn, prepare if dcfg.kind == 'sequence' else None)


# ----------------------------------------------------------------------------- the teacher

def technique(dcfg: DistillConfig, teacher_params, teacher_cfg: ModelConfig) -> loop.Technique:
  """Distillation from `teacher_params` as a `loop.Technique` for `loop.train`."""
  def check(config: TrainConfig):
    if dcfg.kind == 'sequence' and config.data.pack:
      raise ConfigError("distill.kind='sequence' decodes one example a row: set data.pack=False")
    if teacher_cfg.vocab_size != config.model.vocab_size:
      raise ConfigError(f'teacher vocab_size {teacher_cfg.vocab_size} != student '
                        f'{config.model.vocab_size}: distil with the tokenizer the teacher used')

  return loop.Technique(
      name='distill', settings=dataclasses.asdict(dcfg), check=check, extra=teacher_params,
      extra_shardings=lambda mesh, rules: state_lib.params_shardings(teacher_cfg, mesh, rules),
      make_loss=lambda config: distill_loss(dcfg, teacher_cfg,
                                            label_smoothing=config.label_smoothing,
                                            z_loss=config.z_loss))
