"""Pure training and evaluation steps, and their jitted, sharded forms.

  train_step(state, batch, *, model, tx, schedule=None, label_smoothing=0.0, z_loss=0.0,
             grad_accum_steps=1) -> (state, metrics)
  eval_step(params, batch, *, model) -> sums {'loss_sum', 'correct_sum', 'weight_sum'}
  jit_train_step(...), jit_eval_step(...): the same, jitted with explicit in/out shardings and the
  state donated. Call them under `mesh_context(mesh, rules)` so that the models' logical
  activation constraints resolve to mesh axes.

Batches are dicts with T5X's key names (see t5like/data/pipeline.py); segment ids and positions
are optional (without them the encoder's padding mask comes from token id 0).

The loss is the loss-weighted mean token cross-entropy over the whole global batch, optionally
with label smoothing (T5X's normalising constant, so a perfect prediction scores 0) and z-loss
(`z_loss * log(Z)^2`, PaLM / T5X). Gradient accumulation splits the batch into
`grad_accum_steps` microbatches (row i goes to microbatch i mod M, so every device keeps its share)
and sums their gradients in a `lax.scan`; each microbatch's loss is divided by the weight of the
*whole* batch, so the accumulated gradient equals the big-batch gradient exactly.

Per-step randomness (dropout) is `jax.random.fold_in(state.rng, state.step)`, then folded with the
microbatch index, so a resumed run draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from t5like import precision
from t5like.optim import adaptive
from t5like.parallel import partition
from t5like.train.state import TrainState

Batch = Mapping[str, jax.Array]


def cross_entropy_sums(logits_BTV, targets_BT, weights_BT, label_smoothing: float = 0.0,
                       z_loss: float = 0.0):
  """Weighted sums over tokens: (cross-entropy, z-loss, correct predictions).

  Never builds a one-hot [B, T, V]: with log p = logits - log Z,
  smoothed CE = -(c - l) * log p[target] - l * sum_v log p[v] - const, where c = 1 - smoothing,
  l = smoothing / (V - 1) and const = -(c log c + (V - 1) l log l).
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  V = logits_BTV.shape[-1]
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  if label_smoothing:
    conf = 1.0 - label_smoothing
    low = label_smoothing / (V - 1)
    const = -(conf * jnp.log(conf) + (V - 1) * low * jnp.log(low + 1e-20))
    sum_logp_BT = jnp.sum(logits_BTV, axis=-1) - V * log_z_BT
    nll_BT = (conf - low) * nll_BT - low * sum_logp_BT - const
  w = weights_BT.astype(jnp.float32)
  z_BT = z_loss * jnp.square(log_z_BT) if z_loss else jnp.zeros_like(log_z_BT)
  # The target holds the row maximum: argmax == target up to exact ties, as one max reduction
  # (XLA:CPU's (value, index) argmax reduction costs about 2% of a t5_small train step).
  top_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
  correct_BT = (target_logit_BT >= top_BT).astype(jnp.float32)
  return jnp.sum(nll_BT * w), jnp.sum(z_BT * w), jnp.sum(correct_BT * w)


def apply_model(model: nn.Module, params, batch: Batch, *, deterministic: bool, rng=None):
  """Teacher-forced logits [B, T, V] (float32) of `batch`."""
  get = batch.get
  rngs = None if deterministic or rng is None else {'dropout': rng}
  if model.cfg.is_encdec:
    return model.apply({'params': params}, batch['encoder_input_tokens'],
                       batch['decoder_input_tokens'],
                       encoder_segment_ids=get('encoder_segment_ids'),
                       decoder_segment_ids=get('decoder_segment_ids'),
                       encoder_positions=get('encoder_positions'),
                       decoder_positions=get('decoder_positions'),
                       deterministic=deterministic, rngs=rngs)
  return model.apply({'params': params}, batch['decoder_input_tokens'],
                     decoder_segment_ids=get('decoder_segment_ids'),
                     decoder_positions=get('decoder_positions'),
                     deterministic=deterministic, rngs=rngs)


def _loss_weights(batch: Batch):
  if 'decoder_loss_weights' in batch:
    return batch['decoder_loss_weights'].astype(jnp.float32)
  return (batch['decoder_target_tokens'] != 0).astype(jnp.float32)


def _split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [M, B/M, ...]; microbatch m holds rows m, m + M, ... (each device keeps its share)."""
  def split(x):
    B = x.shape[0]
    if B % num:
      raise ValueError(f'grad_accum_steps={num} must divide the batch size {B}')
    x = x.reshape((B // num, num) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, dict(batch))


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: Callable | None = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch`; returns the new state and scalar metrics.

  Metrics: 'loss' (weighted mean cross-entropy, without z-loss), 'z_loss', 'accuracy',
  'grad_norm' (global norm before clipping), 'learning_rate' (of this update, when `schedule` is
  given), 'tokens' (sum of loss weights: the target tokens trained on), 'loss_scale', for
  'fp16', 'skipped' (overflowing steps so far), and, when the optimizer has them
  (`t5like.optim.adaptive`), 'skipped_steps' (updates skipped on gradient-norm spikes so far),
  'lr_grad_scale' and 'lr_plateau_scale'.
  """
  weights = _loss_weights(batch)
  total_weight = jnp.maximum(jnp.sum(weights), 1.0)
  step_rng = jax.random.fold_in(state.rng, state.step)
  ls = state.loss_scale

  def loss_fn(params, mb, rng):
    logits = apply_model(model, params, mb, deterministic=False, rng=rng)
    ce, zl, correct = cross_entropy_sums(logits, mb['decoder_target_tokens'], _loss_weights(mb),
                                         label_smoothing, z_loss)
    return ls.scale((ce + zl) / total_weight), (ce, zl, correct)

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    grads, sums = grad_fn(state.params, batch, step_rng)
  else:
    micro = _split_microbatches(batch, grad_accum_steps)

    def body(carry, xs):
      i, mb = xs
      g, s = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, carry, (g, s)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), (jnp.zeros([], jnp.float32),) * 3)
    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
  grads = ls.unscale(grads)
  ce, zl, correct = sums

  metrics = {'loss': ce / total_weight, 'z_loss': zl / total_weight,
             'accuracy': correct / total_weight, 'grad_norm': optax.global_norm(grads),
             'tokens': jnp.sum(weights), 'loss_scale': ls.loss_scale}
  return apply_gradients(state, grads, tx, metrics, schedule)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    metrics: dict[str, jax.Array], schedule: Callable | None = None):
  """The update shared by every training step (also distillation's): the optimizer step, an fp16
  overflow skip (params and optimizer state kept, loss scale adjusted), and the optimizer's own
  metrics. `grads` are unscaled. Returns (new state, metrics with those added)."""
  metrics = dict(metrics)
  ls = state.loss_scale
  if schedule is not None:
    metrics['learning_rate'] = adaptive.optimizer_metrics(state.opt_state, schedule)['learning_rate']
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if isinstance(ls, precision.DynamicLossScale):
    finite = precision.all_finite(grads)
    params = precision.select_tree(finite, params, state.params)
    opt_state = precision.select_tree(finite, opt_state, state.opt_state)
    ls = ls.adjust(finite)
    metrics['skipped'] = ls.skipped
  # Adaptive parts of the optimizer (after the update, and after an fp16 skip restored the state):
  # updates skipped on gradient-norm spikes, the gradient-statistics and plateau lr factors.
  opt_metrics = adaptive.optimizer_metrics(opt_state)
  for k in ('skipped_steps', 'lr_grad_scale', 'lr_plateau_scale'):
    if k in opt_metrics:
      metrics[k] = opt_metrics[k]
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            loss_scale=ls)
  return new_state, metrics


def eval_step(params, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the batch's weighted target tokens: 'loss_sum', 'correct_sum', 'weight_sum'."""
  logits = apply_model(model, params, batch, deterministic=True)
  weights = _loss_weights(batch)
  ce, _, correct = cross_entropy_sums(logits, batch['decoder_target_tokens'], weights)
  return {'loss_sum': ce, 'correct_sum': correct, 'weight_sum': jnp.sum(weights)}


def batch_shardings(mesh: Mesh, batch_like: Mapping[str, Any]):
  """A NamedSharding per batch key: leading axis over ('data', 'fsdp')."""
  return {k: partition.batch_sharding(mesh, len(v.shape)) for k, v in batch_like.items()}


def jit_train_step(*, model: nn.Module, tx: optax.GradientTransformation, state_shardings,
                   batch_shardings: Mapping[str, Any], mesh: Mesh,
                   schedule: Callable | None = None, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, grad_accum_steps: int = 1):
  """`train_step` jitted with explicit shardings; the input state is donated."""
  fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                         label_smoothing=label_smoothing, z_loss=z_loss,
                         grad_accum_steps=grad_accum_steps)
  return jax.jit(fn, in_shardings=(state_shardings, dict(batch_shardings)),
                 out_shardings=(state_shardings, partition.replicated(mesh)), donate_argnums=0)


def jit_eval_step(*, model: nn.Module, params_shardings, batch_shardings: Mapping[str, Any],
                  mesh: Mesh):
  """`eval_step` jitted with explicit shardings (parameters are not donated)."""
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(params_shardings, dict(batch_shardings)),
                 out_shardings=partition.replicated(mesh))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules, mesh_cfg=None):
  """The mesh (jax.set_mesh), the logical-axis rules the models' activation constraints resolve
  against, and the pipeline schedule when the mesh has stages (t5like.parallel.mesh.activate)."""
  from t5like.parallel import mesh as mesh_lib
  with mesh_lib.activate(mesh, rules, mesh_cfg):
    yield
