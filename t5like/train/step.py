"""Pure training and evaluation steps, their jitted, sharded forms, and the pluggable loss.

  train_step(state, batch, extra=None, *, model, tx, loss=None, schedule=None,
             label_smoothing=0.0, z_loss=0.0, grad_accum_steps=1) -> (state, metrics)
  eval_step(params, batch, *, model) -> sums {'loss_sum', 'correct_sum', 'weight_sum'}
  jit_train_step(...), jit_eval_step(...): the same, jitted with explicit in/out shardings and the
  state donated. Call them under `mesh_context(mesh, rules, mesh_cfg)` so that the models' logical
  activation constraints resolve to mesh axes (and a mesh with stages runs its pipeline).

Batches are dicts with T5X's key names (see t5like/data/pipeline.py); segment ids and positions
are optional (without them the encoder's padding mask comes from token id 0). `model_args` is the
one place that turns such a batch into `model.apply` arguments.

What a step minimises is a `Loss`: the default, `cross_entropy_loss`, is the token cross-entropy,
optionally with label smoothing (T5X's normalising constant, so a perfect prediction scores 0) and
z-loss (`z_loss * log(Z)^2`, PaLM / T5X). Techniques that train (distillation) pass their own
`Loss`, and the step's `extra` argument carries what it needs besides the batch (teacher params).
A loss returns *sums* over the weighted target tokens of its (micro)batch; the step divides every
sum by the loss weight of the whole batch. Gradient accumulation splits the batch into
`grad_accum_steps` microbatches (row i goes to microbatch i mod M, so every device keeps its share)
and sums their gradients in a `lax.scan`; since each microbatch's sums are divided by the weight of
the *whole* batch, the accumulated gradient equals the big-batch gradient exactly.

Per-step randomness (dropout) is `jax.random.fold_in(state.rng, state.step)`, then folded with the
microbatch index, so a resumed run draws the same masks as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from t5like import precision
from t5like.config import ModelConfig
from t5like.optim import adaptive
from t5like.parallel import partition
from t5like.parallel import mesh as mesh_lib
from t5like.train.state import TrainState

Batch = Mapping[str, jax.Array]
# Where steps are traced and run: the mesh, its logical-axis rules and pipeline schedule.
mesh_context = mesh_lib.activate
# Sums over a (micro)batch's weighted target tokens: (what the gradient is taken of, metric sums).
LossSums = tuple[jax.Array, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Loss:
  """What a training step minimises.

  fn(model, params, batch, rng, extra) -> (objective_sum, metric_sums): sums over the weighted
    target tokens of `batch` (a microbatch under gradient accumulation). The step takes the
    gradient of objective_sum / W and reports metric_sums[k] / W as metric k, where W is the loss
    weight of the whole batch (`loss_weights`); 'loss' and 'accuracy' are expected among the
    metrics. `rng` is this microbatch's dropout key; `extra` is the step's extra input (None
    unless the technique gives one, e.g. the teacher's params).
  prepare(batch, extra) -> batch: optional; runs once per step on the whole batch, outside the
    gradient and before the microbatch split (e.g. the teacher's decoding). Keys it adds need a
    leading batch axis.
  """
  fn: Callable[..., LossSums]
  prepare: Callable[[Batch, Any], Batch] | None = None


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


def model_args(cfg: ModelConfig, batch: Batch) -> tuple[tuple, dict]:
  """(positional, keyword) arguments of `model.apply` for a batch dict of T5X keys."""
  kw = {k: batch.get(k) for k in ('decoder_segment_ids', 'decoder_positions')}
  if cfg.is_encdec:
    kw.update(encoder_segment_ids=batch.get('encoder_segment_ids'),
              encoder_positions=batch.get('encoder_positions'))
    return (batch['encoder_input_tokens'], batch['decoder_input_tokens']), kw
  return (batch['decoder_input_tokens'],), kw


def apply_model(model: nn.Module, params, batch: Batch, *, deterministic: bool, rng=None):
  """Teacher-forced logits [B, T, V] of `batch`."""
  rngs = None if deterministic or rng is None else {'dropout': rng}
  args, kw = model_args(model.cfg, batch)
  return model.apply({'params': params}, *args, **kw, deterministic=deterministic, rngs=rngs)


def loss_weights(batch: Batch):
  """[B, T] float32 weight of each target token: `decoder_loss_weights`, else target != 0."""
  if 'decoder_loss_weights' in batch:
    return batch['decoder_loss_weights'].astype(jnp.float32)
  return (batch['decoder_target_tokens'] != 0).astype(jnp.float32)


def cross_entropy_loss(label_smoothing: float = 0.0, z_loss: float = 0.0) -> Loss:
  """The default `Loss`: token cross-entropy (+ z-loss). Metrics 'loss' (without z-loss),
  'z_loss', 'accuracy'."""
  def fn(model, params, batch, rng, extra):
    del extra
    logits = apply_model(model, params, batch, deterministic=False, rng=rng)
    ce, zl, correct = cross_entropy_sums(logits, batch['decoder_target_tokens'],
                                         loss_weights(batch), label_smoothing, z_loss)
    return ce + zl, {'loss': ce, 'z_loss': zl, 'accuracy': correct}
  return Loss(fn)


def _split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [M, B/M, ...]; microbatch m holds rows m, m + M, ... (each device keeps its share)."""
  def split(x):
    B = x.shape[0]
    if B % num:
      raise ValueError(f'grad_accum_steps={num} must divide the batch size {B}')
    x = x.reshape((B // num, num) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, dict(batch))


def train_step(state: TrainState, batch: Batch, extra: Any = None, *, model: nn.Module,
               tx: optax.GradientTransformation, loss: Loss | None = None,
               schedule: Callable | None = None, label_smoothing: float = 0.0,
               z_loss: float = 0.0,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch`; returns the new state and scalar metrics.

  `loss` defaults to `cross_entropy_loss(label_smoothing, z_loss)`; `extra` is passed to it.
  Metrics: the loss's (for the default: 'loss', 'z_loss', 'accuracy'), 'grad_norm' (global norm
  before clipping), 'learning_rate' (of this update, when `schedule` is given), 'tokens' (sum of
  loss weights: the target tokens trained on), 'loss_scale', for 'fp16', 'skipped' (overflowing
  steps so far), and, when the optimizer has them (`t5like.optim.adaptive`), 'skipped_steps'
  (updates skipped on gradient-norm spikes so far), 'lr_grad_scale' and 'lr_plateau_scale'.
  """
  loss = loss or cross_entropy_loss(label_smoothing, z_loss)
  if loss.prepare is not None:
    batch = loss.prepare(batch, extra)
  weights = loss_weights(batch)
  total_weight = jnp.maximum(jnp.sum(weights), 1.0)
  step_rng = jax.random.fold_in(state.rng, state.step)
  ls = state.loss_scale

  def loss_fn(params, mb, rng):
    objective, sums = loss.fn(model, params, mb, rng, extra)
    return ls.scale(objective / total_weight), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    grads, sums = grad_fn(state.params, batch, step_rng)
  else:
    micro = _split_microbatches(batch, grad_accum_steps)

    def body(carry, xs):
      i, mb = xs
      g, s = grad_fn(state.params, mb, jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, carry, (g, s)), None

    first = jax.tree.map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: grad_fn(state.params, first, step_rng)[1])
    zeros = (jax.tree.map(jnp.zeros_like, state.params),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
  grads = ls.unscale(grads)

  metrics = {k: v / total_weight for k, v in sums.items()}
  metrics.update(grad_norm=optax.global_norm(grads), tokens=jnp.sum(weights),
                 loss_scale=ls.loss_scale)
  return apply_gradients(state, grads, tx, metrics, schedule)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    metrics: dict[str, jax.Array], schedule: Callable | None = None):
  """The update after the gradient: the optimizer step, an fp16 overflow skip (params and
  optimizer state kept, loss scale adjusted), and the optimizer's own metrics. `grads` are
  unscaled. Returns (new state, metrics with those added)."""
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
  weights = loss_weights(batch)
  ce, _, correct = cross_entropy_sums(logits, batch['decoder_target_tokens'], weights)
  return {'loss_sum': ce, 'correct_sum': correct, 'weight_sum': jnp.sum(weights)}


def batch_shardings(mesh: Mesh, batch_like: Mapping[str, Any]):
  """A NamedSharding per batch key: leading axis over ('data', 'fsdp')."""
  return {k: partition.batch_sharding(mesh, len(v.shape)) for k, v in batch_like.items()}


def jit_train_step(*, model: nn.Module, tx: optax.GradientTransformation, state_shardings,
                   batch_shardings: Mapping[str, Any], mesh: Mesh, loss: Loss | None = None,
                   extra_shardings: Any = None, schedule: Callable | None = None,
                   label_smoothing: float = 0.0, z_loss: float = 0.0, grad_accum_steps: int = 1):
  """`train_step` jitted with explicit shardings; the input state is donated.

  Called as fn(state, batch), or fn(state, batch, extra) when `extra_shardings` (a sharding per
  leaf of the extra input, or one for all) is given; the extra input is not donated.
  """
  fn = functools.partial(train_step, model=model, tx=tx, loss=loss, schedule=schedule,
                         label_smoothing=label_smoothing, z_loss=z_loss,
                         grad_accum_steps=grad_accum_steps)
  in_shardings = (state_shardings, dict(batch_shardings))
  if extra_shardings is not None:
    in_shardings += (extra_shardings,)
  return jax.jit(fn, in_shardings=in_shardings,
                 out_shardings=(state_shardings, partition.replicated(mesh)), donate_argnums=0)


def jit_eval_step(*, model: nn.Module, params_shardings, batch_shardings: Mapping[str, Any],
                  mesh: Mesh):
  """`eval_step` jitted with explicit shardings (parameters are not donated)."""
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(params_shardings, dict(batch_shardings)),
                 out_shardings=partition.replicated(mesh))
