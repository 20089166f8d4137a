"""Knowledge distillation: soft, hard and sequence-level targets, a jitted step and its run.

Shape letters: B batch, T target length, S source length, V vocab.

Losses (each a token-weighted mean over `decoder_loss_weights`; the teacher under stop_gradient):
- 'soft': T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015; the T^2
  keeps the gradient scale independent of T);
- 'hard': cross-entropy of the student on the teacher's argmax tokens;
- 'sequence': the teacher's greedy decode of each encoder input becomes the target sequence and the
  student is trained on it with cross-entropy (Kim and Rush 2016; `t5like.infer.decode.greedy`).
The training loss is `(1 - alpha) * data CE + alpha * distillation loss`.

`distill_step` mirrors `t5like.train.step.train_step` (loss scaling, metrics, per-step rng) with
this loss; `train_distill` runs it with the trainer's pieces: the data pipeline, the sharded train
state, `t5like.train.checkpoint.Checkpointer` (state + data-iterator position + config, so a run
resumes exactly), `MetricsWriter` and the evaluation of `t5like.train.loop`. It keeps its own
short loop because `loop.train` has no pluggable step function (see the final report).

Written here because no maintained JAX library provides these losses for linen pytrees; the
formulas are the papers'.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5like.config import ConfigError, ModelConfig, TrainConfig

KINDS = ('soft', 'hard', 'sequence')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """How the student learns from the teacher."""
  kind: str = 'soft'              # 'soft', 'hard' or 'sequence'
  alpha: float = 0.5              # weight of the distillation loss; 1 - alpha on the data loss
  temperature: float = 2.0        # 'soft' only

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f'distill.kind={self.kind!r} is not valid; choose one of {list(KINDS)}')
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f'distill.alpha must be in [0, 1], got {self.alpha}')
    if self.temperature <= 0:
      raise ConfigError(f'distill.temperature must be positive, got {self.temperature}')


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
  """Hinton et al. (2015): weighted mean of T^2 * KL(teacher_T || student_T)."""
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
  """Kim and Rush (2016): the batch with the teacher's greedy outputs as decoder targets.

  Encoder-decoder and unpacked batches only (one example a row): each row's encoder input is
  decoded for T tokens (T of the batch); targets are the decoded tokens up to and including EOS.
  """
  from t5like.infer import decode  # the decoding API
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


def distillation_loss(student_BTV, teacher_BTV, batch: Mapping[str, jax.Array],
                      dcfg: DistillConfig, student_seq_BTV=None, seq_batch=None):
  """(total loss, {'data_loss', 'distill_loss'}) for one batch; see the module docstring.

  For 'sequence', `student_seq_BTV` are the student's logits on `seq_batch` (the teacher's
  outputs as targets); `teacher_BTV` is unused.
  """
  w = batch['decoder_loss_weights'] if 'decoder_loss_weights' in batch else (
      (batch['decoder_target_tokens'] != 0).astype(jnp.float32))
  data = _weighted_mean(token_ce_BT(student_BTV, batch['decoder_target_tokens']), w)
  if dcfg.kind == 'soft':
    dist = soft_target_loss(student_BTV, teacher_BTV, w, dcfg.temperature)
  elif dcfg.kind == 'hard':
    dist = hard_target_loss(student_BTV, teacher_BTV, w)
  else:
    if student_seq_BTV is None or seq_batch is None:
      raise ValueError("kind='sequence' needs the student's logits on the teacher's sequences")
    dist = _weighted_mean(token_ce_BT(student_seq_BTV, seq_batch['decoder_target_tokens']),
                          seq_batch['decoder_loss_weights'])
  total = (1.0 - dcfg.alpha) * data + dcfg.alpha * dist
  return total, {'data_loss': data, 'distill_loss': dist}


# ----------------------------------------------------------------------------- the step

def distill_step(state, teacher_params, batch, *, model: nn.Module, teacher_model: nn.Module,
                 tx: optax.GradientTransformation, dcfg: DistillConfig,
                 schedule: Callable | None = None):
  """One student update: (new TrainState, metrics). Pure; jit it with `jit_distill_step`.

  Metrics: 'loss' (the mixed loss), 'data_loss', 'distill_loss', 'accuracy' (on the data
  targets), 'grad_norm', 'tokens', 'loss_scale', 'learning_rate' (with `schedule`).
  """
  from t5like.train import step as step_lib
  step_rng = jax.random.fold_in(state.rng, state.step)
  ls = state.loss_scale
  teacher_params = jax.lax.stop_gradient(teacher_params)
  teacher_BTV = None
  seq_batch = None
  if dcfg.kind == 'sequence':
    seq_batch = sequence_targets(teacher_params, teacher_model.cfg, batch)
  elif dcfg.alpha > 0:
    teacher_BTV = jax.lax.stop_gradient(
        step_lib.apply_model(teacher_model, teacher_params, batch, deterministic=True))

  def loss_fn(params):
    rng_a, rng_b = jax.random.split(step_rng)
    logits = step_lib.apply_model(model, params, batch, deterministic=False, rng=rng_a)
    seq_logits = None
    if seq_batch is not None:
      seq_logits = step_lib.apply_model(model, params, seq_batch, deterministic=False, rng=rng_b)
    total, parts = distillation_loss(logits, teacher_BTV, batch, dcfg, seq_logits, seq_batch)
    return ls.scale(total), (total, parts, logits)

  grads, (total, parts, logits) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = ls.unscale(grads)
  weights = step_lib._loss_weights(batch)  # pylint: disable=protected-access
  correct = (jnp.argmax(logits, -1) == batch['decoder_target_tokens']).astype(jnp.float32)
  metrics = {'loss': total, **parts, 'accuracy': _weighted_mean(correct, weights),
             'grad_norm': optax.global_norm(grads), 'tokens': jnp.sum(weights),
             'loss_scale': ls.loss_scale}
  return step_lib.apply_gradients(state, grads, tx, metrics, schedule)


def jit_distill_step(*, model, teacher_model, tx, dcfg: DistillConfig, state_shardings,
                     teacher_shardings, batch_shardings, mesh, schedule=None):
  """`distill_step` jitted with explicit shardings; the student state is donated."""
  from t5like.parallel import partition
  fn = functools.partial(distill_step, model=model, teacher_model=teacher_model, tx=tx, dcfg=dcfg,
                         schedule=schedule)
  return jax.jit(fn, in_shardings=(state_shardings, teacher_shardings, dict(batch_shardings)),
                 out_shardings=(state_shardings, partition.replicated(mesh)), donate_argnums=0)


# ----------------------------------------------------------------------------- the run

def train_distill(config: TrainConfig, dcfg: DistillConfig, teacher_params,
                  teacher_cfg: ModelConfig, workdir: str,
                  print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (or resumes) the student `config.model` from the teacher in `workdir`.

  The same data, schedule, evaluation (validation CE of the student) and checkpoints as
  `t5like.train.loop.train`; the config written with each checkpoint carries the distillation
  settings under 'distill', and resuming checks the student's model config against it. Returns
  {'final_step', 'final_val_loss', 'evals': [(step, val loss)], 'metrics_file', ...}.
  """
  from t5like import config as config_lib
  from t5like.data import pipeline
  from t5like.models import build_model
  from t5like.optim import make_optimizer, make_schedule
  from t5like.parallel import partition
  from t5like.parallel.mesh import get_rules, make_mesh
  from t5like.train import checkpoint as ckpt_lib
  from t5like.train import loop as loop_lib
  from t5like.train import metrics as metrics_lib
  from t5like.train import state as state_lib
  from t5like.train import step as step_lib

  if dcfg.kind == 'sequence' and config.data.pack:
    raise ConfigError("distill.kind='sequence' decodes one example a row: set data.pack=False")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config.mesh)
  rules = get_rules(config.mesh.rules)
  train_iter, eval_batches, tokenizer = pipeline.make_datasets(
      config.data, config.model.arch, workdir, seed=config.seed)
  config = loop_lib.resolve_config(config, tokenizer)
  if teacher_cfg.vocab_size != config.model.vocab_size:
    raise ConfigError(f'teacher vocab_size {teacher_cfg.vocab_size} != student '
                      f'{config.model.vocab_size}: distil with the tokenizer the teacher used')
  config_dict = dict(config_lib.to_dict(config), distill=dataclasses.asdict(dcfg))
  loop_lib.write_json_atomic(os.path.join(workdir, loop_lib.CONFIG_FILE), config_dict)

  model, teacher_model = build_model(config.model), build_model(teacher_cfg)
  schedule = make_schedule(config.optim, config.num_steps)
  tx = make_optimizer(config.optim, None, config.num_steps)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, loop_lib.CHECKPOINT_DIR),
                               keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
                               async_save=config.async_checkpointing)
  try:
    abstract, shardings = state_lib.abstract_train_state(config.model, tx, mesh, rules)
    start = ckpt.latest_step()
    if start is None:
      state, shardings = state_lib.create_train_state(config.model, tx, mesh, rules, config.seed)
      start = 0
    else:
      ckpt.check_compatible(start, config_dict)
      state, data_state, _ = ckpt.restore(start, abstract)
      train_iter.set_state(data_state)
      print_fn(f'resumed from {ckpt.path(start)} (step {start})')
    teacher_sh = jax.tree.map(lambda _: partition.replicated(mesh), teacher_params)
    teacher_params = jax.device_put(teacher_params, teacher_sh)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start if start else None)
    batch = next(train_iter)
    batch_sh = step_lib.batch_shardings(mesh, batch)
    step_fn = jit_distill_step(model=model, teacher_model=teacher_model, tx=tx, dcfg=dcfg,
                               state_shardings=shardings, teacher_shardings=teacher_sh,
                               batch_shardings=batch_sh, mesh=mesh, schedule=schedule)
    eval_fn = step_lib.jit_eval_step(model=model, params_shardings=shardings.params,
                                     batch_shardings=batch_sh, mesh=mesh)
    run_eval = lambda p: loop_lib.evaluate(eval_fn, p, eval_batches, mesh, config.eval_batches)
    progress = metrics_lib.ProgressLine(config.num_steps, start)
    t0, step = time.perf_counter(), start
    with step_lib.mesh_context(mesh, rules):
      if start == 0:
        writer.write(0, run_eval(state.params), 'eval')
      while step < config.num_steps:
        state, m = step_fn(state, teacher_params, pipeline.to_global_batch(batch, mesh))
        step += 1
        last = step == config.num_steps
        is_eval = step % config.eval_every == 0 or last
        if step % config.log_every == 0 or is_eval or step % config.checkpoint_every == 0:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          metrics_lib.check_finite(step, m)
          writer.write(step, m)
          print_fn(progress.line(step, m))
        val_loss = None
        if is_eval:
          val = run_eval(state.params)
          val_loss = val['loss']
          writer.write(step, val, 'eval')
          print_fn(f'step {step}: student validation loss {val_loss:.4f}')
        if is_eval or step % config.checkpoint_every == 0:
          ckpt.save(step, state, train_iter.get_state(), config_dict, val_loss=val_loss)
        if not last:
          batch = next(train_iter)
      ckpt.wait()
    writer.close()
  finally:
    ckpt.close()
  evals = [(r['step'], r['loss']) for r in metrics_lib.read_jsonl(writer.path)
           if r.get('split') == 'eval']
  return {'final_step': step, 'start_step': start, 'final_val_loss': evals[-1][1] if evals else None,
          'evals': evals, 'metrics_file': writer.path, 'wall_s': time.perf_counter() - t0,
          'params': state.params, 'model_cfg': config.model}
