"""Choosing tokens from logits: greedy argmax, per-row temperature / top-k / top-p sampling.

Used by every decoding loop (t5like/infer/decode.py) and the serving engine (engine.py), so the
filters exist once. Sampling settings may be scalars or one value per row [B].
Shape letters: B batch (rows), V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def argmax(logits_BV):
  """jnp.argmax over the last axis (lowest index on ties) as two plain reductions.

  XLA:CPU runs the (value, index) pair reduction of jnp.argmax about 8x slower than a max; this
  is a max, then the smallest index holding it. Rows with NaN give index 0.
  """
  V = logits_BV.shape[-1]
  top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, logits_BV.ndim - 1)
  idx_B = jnp.min(jnp.where(logits_BV == top_B1, iota, V), axis=-1)
  return jnp.where(idx_B == V, 0, idx_B).astype(jnp.int32)


def token_logprob(logits_BV, tok_B):
  """log_softmax(logits)[tok] without materialising the [B, V] log-probabilities."""
  picked_B = jnp.take_along_axis(logits_BV, tok_B[:, None], axis=1)[:, 0]
  return picked_B - jax.nn.logsumexp(logits_BV, axis=-1)


def greedy_pick(logits_BV):
  """(argmax token [B], its log-probability [B])."""
  tok_B = argmax(logits_BV)
  return tok_B, token_logprob(logits_BV, tok_B)


def _rows(value, B: int, dtype):
  return jnp.broadcast_to(jnp.asarray(value, dtype), (B,))


def filter_logits(logits_BV, temperature, top_k, top_p):
  """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become the dtype's
  lowest value. top_k 0 and top_p >= 1 are off. The nucleus is the smallest prefix of the top-k
  distribution (renormalised) whose mass reaches top_p, always at least the top token."""
  B, V = logits_BV.shape
  t_B, k_B, p_B = _rows(temperature, B, jnp.float32), _rows(top_k, B, jnp.int32), _rows(
      top_p, B, jnp.float32)
  scaled_BV = logits_BV / jnp.maximum(t_B, 1e-6)[:, None]
  neg_inf = jnp.finfo(scaled_BV.dtype).min
  sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
  in_k_BV = jnp.arange(V)[None] < jnp.where(k_B > 0, k_B, V)[:, None]
  probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV, -jnp.inf), axis=-1)
  in_p_BV = ((jnp.cumsum(probs_BV, axis=-1) - probs_BV) < p_B[:, None]) | (p_B[:, None] >= 1.0)
  cutoff_B1 = jnp.min(jnp.where(in_k_BV & in_p_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled_BV < cutoff_B1, neg_inf, scaled_BV)


def draw(logits_BV, keys_B):
  """One token per row [B] int32 from softmax(logits), by inverse CDF: one uniform per row
  against the cumulative sum. jax.random.categorical's Gumbel-max draws a random number per
  vocabulary entry, which on a CPU costs about ten greedy picks."""
  p_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))
  cdf_BV = jnp.cumsum(p_BV, axis=-1)
  u_B = jax.vmap(jax.random.uniform)(keys_B)
  return jnp.sum(cdf_BV < (u_B * cdf_BV[:, -1])[:, None], axis=-1).astype(jnp.int32)


def sample(logits_BV, keys_B, temperature, top_k=0, top_p=1.0):
  """One token per row [B] int32: drawn from the filtered logits with that row's key, or the
  argmax where the row's temperature is <= 0. Three paths, by what the rows ask: all greedy
  (nothing drawn), temperature only (no sort over the vocabulary), or top-k / top-p filtering."""
  B, V = logits_BV.shape
  t_B = _rows(temperature, B, jnp.float32)
  k_B, p_B = _rows(top_k, B, jnp.int32), _rows(top_p, B, jnp.float32)
  greedy_B = argmax(logits_BV)

  def plain(_):
    drawn_B = draw(logits_BV / jnp.maximum(t_B, 1e-6)[:, None], keys_B)
    return jnp.where(t_B <= 0, greedy_B, drawn_B)

  def filtered(_):
    drawn_B = draw(filter_logits(logits_BV, t_B, k_B, p_B), keys_B)
    return jnp.where(t_B <= 0, greedy_B, drawn_B)

  filters = jnp.any((t_B > 0) & (((k_B > 0) & (k_B < V)) | (p_B < 1.0)))
  path = jnp.where(jnp.all(t_B <= 0), 0, jnp.where(filters, 2, 1))
  return jax.lax.switch(path, [lambda _: greedy_B, plain, filtered], None)
