"""Multi-head attention with T5's relative position bias, optional RoPE and a KV cache.

Shape letters: B batch, T query length, S key length, D d_model, N heads, H head dim.

Cached keys are [B, N, H, S] and cached values [B, N, S, H] (decoding): in these layouts both
attention products read the cache in place, where [B, S, N, H] costs XLA a transposed copy of
every layer's cache on every step (T5X keeps keys [B, N, H, S] for the same reason).

T5 does not scale attention logits by 1/sqrt(H); the query projection's initialisation carries
that factor instead. Masks are folded into one additive float32 bias [B, N, T, S].
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5like.config import ModelConfig
from t5like.models.layers import constrain, einsum_class, normal_init, policy_of

NEG_INF = -1e10  # large but finite, so fully masked rows stay NaN-free


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128):
  """T5's bucketing of (key position - query position), as in the T5 / Mesh TF reference."""
  rp = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(rp)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rp > 0).astype(jnp.int32) * num_buckets
    rp = jnp.abs(rp)
  else:
    rp = -jnp.minimum(rp, 0)
  max_exact = num_buckets // 2
  is_small = rp < max_exact
  safe = jnp.maximum(rp, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact) *
                       (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, rp, large)


class RelativePositionBias(nn.Module):
  """One learned bias per (head, bucket), shared by all layers of a stack."""
  cfg: ModelConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos_BT, k_pos_BS):
    cfg = self.cfg
    table_NK = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(normal_init(cfg.d_model ** -0.5), ('heads', 'relpos_buckets')),
        (cfg.num_heads, cfg.relative_attention_num_buckets), policy_of(cfg).param_dtype)
    rel_BTS = k_pos_BS[:, None, :] - q_pos_BT[:, :, None]
    bucket_BTS = relative_position_bucket(rel_BTS, self.bidirectional,
                                          cfg.relative_attention_num_buckets,
                                          cfg.relative_attention_max_distance)
    # One-hot matmul rather than a gather: cheaper to differentiate and shards cleanly.
    onehot_BTSK = jax.nn.one_hot(bucket_BTS, cfg.relative_attention_num_buckets, dtype=jnp.float32)
    return jnp.einsum('BTSK,NK->BNTS', onehot_BTSK, table_NK.astype(jnp.float32))


def rope(x_BTNH, pos_BT, max_wavelength: float):
  """Rotary position embedding (rotate-half convention) in float32."""
  H = x_BTNH.shape[-1]
  freq = max_wavelength ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
  angle_BTK = pos_BT[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle_BTK)[:, :, None, :], jnp.cos(angle_BTK)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def mask_to_bias(mask_BTS):
  """Boolean [B, T, S] (True = may attend) -> additive float32 bias [B, 1, T, S]."""
  return jnp.where(mask_BTS, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def keys_to_cache(k_BSNH):
  return jnp.transpose(k_BSNH, (0, 2, 3, 1))    # [B, N, H, S]


def values_to_cache(v_BSNH):
  return jnp.swapaxes(v_BSNH, 1, 2)             # [B, N, S, H]


def write_cache(cache, new_BTNH, index_B, *, keys: bool):
  """Writes `new` into each row's cache at that row's own offset (slots decode independently).

  cache: keys [B, N, H, S] or values [B, N, S, H]. A scatter rather than a per-row
  dynamic_update_slice: XLA updates it in place inside a decoding loop, where the vmapped
  slice update costs three copies of the cache per step. Positions past the end are dropped.
  """
  B, T = new_BTNH.shape[:2]
  pos_BT = index_B[:, None] + jnp.arange(T, dtype=index_B.dtype)
  row_BT = jnp.broadcast_to(jnp.arange(B, dtype=index_B.dtype)[:, None], (B, T))
  at = cache.at[row_BT, :, :, pos_BT] if keys else cache.at[row_BT, :, pos_BT, :]
  return at.set(new_BTNH.astype(cache.dtype), mode='drop', unique_indices=True)


class Attention(nn.Module):
  """Multi-head attention: `__call__` (self- or cross-attention over a sequence), `step` (self-
  attention of new positions appended to a KV cache), `cross_step` (over precomputed K/V).

  `qkv`, `attend`, `attend_cached` and `attend_cache` are the parts a decode backend may replace
  (t5like/infer/backend.py); each takes and returns arrays only.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
    proj = einsum_class(cfg)
    qkv = lambda std: proj(cfg, 'BTD,DNH->BTNH', (D, N, H), ('embed', 'heads', 'kv'), std)
    self.query = qkv((D * H) ** -0.5)
    self.key = qkv(D ** -0.5)
    self.value = qkv(D ** -0.5)
    self.out = proj(cfg, 'BTNH,NHD->BTD', (N, H, D), ('heads', 'kv', 'embed'), (N * H) ** -0.5,
                    contract_dims=2)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def qkv(self, x_BTD):
    """Queries, keys and values [B, T, N, H] of x (self-attention)."""
    return self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)

  def project_kv_cache(self, kv_BSD):
    """Keys [B, N, H, S] and values [B, N, S, H], the cache layouts."""
    return keys_to_cache(self.key(kv_BSD)), values_to_cache(self.value(kv_BSD))

  def __call__(self, x_BTD, bias_BNTS, deterministic: bool, *, kv_BSD=None, rope_q_pos=None,
               rope_k_pos=None):
    """Output [B, T, D]: self-attention, or cross-attention to `kv_BSD`."""
    if kv_BSD is None:
      q_BTNH, k_BSNH, v_BSNH = self.qkv(x_BTD)
    else:
      q_BTNH, k_BSNH, v_BSNH = self.query(x_BTD), self.key(kv_BSD), self.value(kv_BSD)
    if rope_q_pos is not None:
      q_BTNH = rope(q_BTNH, rope_q_pos, self.cfg.rope_max_wavelength)
      k_BSNH = rope(k_BSNH, rope_k_pos, self.cfg.rope_max_wavelength)
    return self.out(self.attend(q_BTNH, k_BSNH, v_BSNH, bias_BNTS, deterministic))

  def step(self, x_BTD, bias_BNTS, cache, index_B, rope_q_pos=None, rope_k_pos=None):
    """Self-attention of T new positions per row, written into `cache` = (keys [B, N, H, S],
    values [B, N, S, H]) at each row's `index_B` first: (output [B, T, D], updated cache)."""
    q_BTNH, k_BTNH, v_BTNH = self.qkv(x_BTD)
    if rope_q_pos is not None:
      q_BTNH = rope(q_BTNH, rope_q_pos, self.cfg.rope_max_wavelength)
      k_BTNH = rope(k_BTNH, rope_k_pos, self.cfg.rope_max_wavelength)
    ctx_BTNH, k, v = self.attend_cached(q_BTNH, k_BTNH, v_BTNH, cache[0], cache[1], index_B,
                                        bias_BNTS)
    return self.out(ctx_BTNH.astype(policy_of(self.cfg).compute_dtype)), (k, v)

  def cross_step(self, x_BTD, bias_BNTS, kv):
    """Attention of x to precomputed `kv` = (keys [B, N, H, S], values [B, N, S, H])."""
    ctx_BTNH = self.attend_cache(self.query(x_BTD), kv[0], kv[1], bias_BNTS)
    return self.out(ctx_BTNH.astype(policy_of(self.cfg).compute_dtype))

  def attend(self, q_BTNH, k_BSNH, v_BSNH, bias_BNTS, deterministic: bool):
    """softmax(q k + bias) v -> context [B, T, N, H]."""
    q_BTNH = constrain(q_BTNH, ('batch', 'length', 'heads', 'kv'))
    k_BSNH = constrain(k_BSNH, ('batch', 'length', 'heads', 'kv'))
    logits_BNTS = jnp.einsum('BTNH,BSNH->BNTS', q_BTNH, k_BSNH.astype(q_BTNH.dtype),
                             preferred_element_type=jnp.float32)
    probs_BNTS = self._probs(logits_BNTS, bias_BNTS)
    probs_BNTS = self.dropout(probs_BNTS, deterministic=deterministic)
    return jnp.einsum('BNTS,BSNH->BTNH', probs_BNTS, v_BSNH.astype(probs_BNTS.dtype))

  def attend_cached(self, q_BTNH, k_BTNH, v_BTNH, keys_BNHS, values_BNSH, index_B, bias_BNTS):
    """Writes the new keys and values into the cache at each row's index, then attends over it:
    (context [B, T, N, H], keys, values)."""
    keys_BNHS = write_cache(keys_BNHS, k_BTNH, index_B, keys=True)
    values_BNSH = write_cache(values_BNSH, v_BTNH, index_B, keys=False)
    # One updated buffer for both the attention and the returned cache: without the barrier XLA
    # duplicates the update into each consumer and copies the cache to do so.
    keys_BNHS, values_BNSH = jax.lax.optimization_barrier((keys_BNHS, values_BNSH))
    return self.attend_cache(q_BTNH, keys_BNHS, values_BNSH, bias_BNTS), keys_BNHS, values_BNSH

  def attend_cache(self, q_BTNH, keys_BNHS, values_BNSH, bias_BNTS):
    """Context [B, T, N, H] of queries over cache-layout keys and values."""
    q_BTNH = constrain(q_BTNH, ('batch', 'length', 'heads', 'kv'))
    keys_BNHS = constrain(keys_BNHS, ('batch', 'heads', 'kv', 'length'))
    logits_BNTS = jnp.einsum('BTNH,BNHS->BNTS', q_BTNH, keys_BNHS.astype(q_BTNH.dtype),
                             preferred_element_type=jnp.float32)
    probs_BNTS = self._probs(logits_BNTS, bias_BNTS)
    return jnp.einsum('BNTS,BNSH->BTNH', probs_BNTS, values_BNSH.astype(probs_BNTS.dtype))

  def _probs(self, logits_BNTS, bias_BNTS):
    return jax.nn.softmax(logits_BNTS + bias_BNTS, axis=-1).astype(
        policy_of(self.cfg).compute_dtype)
