"""AGD: an auto-switchable optimizer using the stepwise gradient difference as preconditioner.

Yue et al., "AGD: an Auto-switchable Optimizer using Stepwise Gradient Difference as
Preconditioning Matrix", NeurIPS 2023 (arXiv 2312.01658); the authors' PyTorch implementation is
`atorch/optimizers/agd.py`. Optax has no AGD, so this module writes it, as optax pieces:
`scale_by_agd` (the preconditioned direction) chained with optax's decoupled weight decay and
learning-rate scaling.

Per leaf, at step t (1-based), with gradient g_t:

  m_t = b1 m_{t-1} + (1 - b1) g_t                    m^_t = m_t / (1 - b1^t)
  s_t = m^_t - m^_{t-1}   (s_1 = m^_1)               the stepwise gradient difference
  b_t = b2 b_{t-1} + (1 - b2) s_t^2                  b^_t = b_t / (1 - b2^t)
  (amsgrad: b_t <- max(b_{t-1}^max, b_t))
  u_t = m^_t / max(sqrt(b^_t), delta)
  p_t = p_{t-1} - lr_t (u_t + weight_decay p_{t-1})

Where sqrt(b^_t) < delta the denominator is the constant delta and the step is SGD with momentum
(learning rate lr / delta); elsewhere it is adaptive. The reference computes the same quantity as
(sqrt(1 - b2^t) / (1 - b1^t)) m_t / max(sqrt(b_t), delta sqrt(1 - b2^t)) and applies its optional
`clip` to m_t / max(sqrt(b_t), delta sqrt(1 - b2^t)) before the bias-correction factor; so does this
module.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax


class ScaleByAgdState(NamedTuple):
  count: jax.Array          # int32 number of steps taken
  mu: Any                   # EMA of gradients (m_t)
  nu: Any                   # EMA of squared bias-corrected momentum differences (b_t)
  nu_max: Any               # running max of nu (amsgrad), or None


def scale_by_agd(b1: float = 0.9, b2: float = 0.999, delta: float = 1e-5, amsgrad: bool = False,
                 clip: Optional[float] = None,
                 mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
  """The AGD direction u_t (see the module docstring); scale it by -lr to get the step.

  Args:
    b1, b2: decay rates of the gradient EMA and of the gradient-difference second moment.
    delta: floor of the (bias-corrected) preconditioner; below it AGD behaves as SGD + momentum.
    amsgrad: keep the running maximum of the second moment.
    clip: if set, clip the un-bias-corrected ratio elementwise to [-clip, clip] (as the reference).
    mu_dtype: dtype of the first moment (default: that of the parameters).
  """
  for name, b in (('b1', b1), ('b2', b2)):
    if not 0.0 <= b < 1.0:
      raise ValueError(f'agd: {name} must be in [0, 1), got {b}')
  if delta < 0.0:
    raise ValueError(f'agd: delta must be >= 0, got {delta}')
  if clip is not None and clip <= 0.0:
    raise ValueError(f'agd: clip must be positive or None, got {clip}')
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
    nu = jax.tree.map(jnp.zeros_like, params)
    nu_max = jax.tree.map(jnp.zeros_like, params) if amsgrad else None
    return ScaleByAgdState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu, nu_max=nu_max)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.result_type(float))   # float64 under x64, else float32
    bc1 = 1.0 - b1 ** t
    bc2 = 1.0 - b2 ** t
    # At t = 1 there is no previous momentum; guard the 0/0 of its bias correction.
    bc1_old = jnp.where(count > 1, 1.0 - b1 ** (t - 1.0), 1.0)

    mu = jax.tree.map(lambda g, m: b1 * m.astype(g.dtype) + (1.0 - b1) * g, updates, state.mu)

    def second_moment(m, m_old, v):
      diff = m / bc1.astype(m.dtype) - m_old.astype(m.dtype) / bc1_old.astype(m.dtype)
      return b2 * v + (1.0 - b2) * jnp.square(diff).astype(v.dtype)

    nu = jax.tree.map(second_moment, mu, state.mu, state.nu)
    if amsgrad:
      nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
      second = nu_max
    else:
      nu_max = None
      second = nu
    floor = delta * jnp.sqrt(bc2)
    bias = jnp.sqrt(bc2) / bc1

    def direction(m, v):
      denom = jnp.maximum(jnp.sqrt(v), floor.astype(v.dtype))
      u = m.astype(v.dtype) / denom
      if clip is not None:
        u = jnp.clip(u, -clip, clip)
      return (bias.astype(u.dtype) * u)

    new_updates = jax.tree.map(direction, mu, second)
    mu = optax.tree.cast(mu, mu_dtype) if mu_dtype is not None else mu
    return new_updates, ScaleByAgdState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def agd(learning_rate: Union[float, optax.Schedule], b1: float = 0.9, b2: float = 0.999,
        delta: float = 1e-5, weight_decay: float = 0.0, amsgrad: bool = False,
        clip: Optional[float] = None, *,
        weight_decay_mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
        mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
  """AGD with decoupled weight decay (p <- p - lr * weight_decay * p), defaults as the reference.

  Args:
    learning_rate: a float or an optax schedule of the step count.
    b1, b2, delta, amsgrad, clip: see `scale_by_agd`.
    weight_decay: decoupled weight-decay coefficient (multiplied by the learning rate).
    weight_decay_mask: pytree of bools (or a function of params returning one): True where decay
      applies. Default: everywhere.
    mu_dtype: dtype of the first moment.
  """
  if weight_decay < 0.0:
    raise ValueError(f'agd: weight_decay must be >= 0, got {weight_decay}')
  parts = [scale_by_agd(b1=b1, b2=b2, delta=delta, amsgrad=amsgrad, clip=clip, mu_dtype=mu_dtype)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
