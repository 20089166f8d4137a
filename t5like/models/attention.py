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
from t5like.kernels import decode_attention
from t5like.models.layers import (Einsum, constrain, fused_packed_projections, normal_init,
                                  policy_of)

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
  """Multi-head attention. Self-attention when `kv_BSD is None`, else cross-attention."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
    qkv = lambda name, std: Einsum(cfg, 'BTD,DNH->BTNH', (D, N, H), ('embed', 'heads', 'kv'), std,
                                   name=name)
    self.query = qkv('query', (D * H) ** -0.5)
    self.key = qkv('key', D ** -0.5)
    self.value = qkv('value', D ** -0.5)
    self.out = Einsum(cfg, 'BTNH,NHD->BTD', (N, H, D), ('heads', 'kv', 'embed'), (N * H) ** -0.5,
                      contract_dims=2, name='out')
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def project_kv(self, kv_BSD):
    return self.key(kv_BSD), self.value(kv_BSD)

  def project_kv_cache(self, kv_BSD):
    """Keys [B, N, H, S] and values [B, N, S, H], the cache layouts."""
    k_BSNH, v_BSNH = self.project_kv(kv_BSD)
    return keys_to_cache(k_BSNH), values_to_cache(v_BSNH)

  def __call__(self, x_BTD, bias_BNTS, deterministic: bool, *, kv_BSD=None, kv=None,
               rope_q_pos=None, rope_k_pos=None, cache=None, cache_index_B=None):
    """Attention output [B, T, D] and the updated (k, v) cache (None without a cache).

    kv: precomputed (k_BNHS, v_BNSH) for cross-attention; cache: (k_BNHS, v_BNSH) buffers that
    this call's keys and values are written into at `cache_index_B` before attending.
    """
    cfg = self.cfg
    policy = policy_of(cfg)
    fused = None if kv is not None or kv_BSD is not None else fused_packed_projections(
        self, ('query', 'key', 'value'), x_BTD)   # a CPU decoding step: one call for q, k, v
    if fused:
      q_BTNH, k, v = fused
    else:
      q_BTNH = self.query(x_BTD)
    if kv is not None:
      k, v = kv
    elif not fused:
      k, v = self.project_kv(x_BTD if kv_BSD is None else kv_BSD)
    if rope_q_pos is not None:
      q_BTNH = rope(q_BTNH, rope_q_pos, cfg.rope_max_wavelength)
      k = rope(k, rope_k_pos, cfg.rope_max_wavelength)
    new_cache = None
    if (cache is not None and decode_attention.wanted(q_BTNH, *cache) and k.dtype == jnp.float32
        and (deterministic or not cfg.dropout_rate)):
      # A decoding step on CPU: cache write and attention in one pass (t5like/kernels).
      ctx_BNH, *new_cache = decode_attention.attend_cached(
          q_BTNH[:, 0], k[:, 0], v[:, 0], cache[0], cache[1], bias_BNTS[:, :, 0], cache_index_B)
      return self.out(ctx_BNH[:, None].astype(policy.compute_dtype)), tuple(new_cache)
    if cache is not None:
      k = write_cache(cache[0], k, cache_index_B, keys=True)
      v = write_cache(cache[1], v, cache_index_B, keys=False)
      # One updated buffer for both the attention and the returned cache: without the barrier XLA
      # duplicates the update into each consumer and copies the cache to do so.
      k, v = jax.lax.optimization_barrier((k, v))
      new_cache = (k, v)
    cached = kv is not None or cache is not None
    k_spec, v_spec = ('BNHS', 'BNSH') if cached else ('BSNH', 'BSNH')
    q_BTNH = constrain(q_BTNH, ('batch', 'length', 'heads', 'kv'))
    k = constrain(k, tuple(_AXES[c] for c in k_spec))
    if cached and decode_attention.wanted(q_BTNH, k, v) and (deterministic or
                                                             not cfg.dropout_rate):
      # A decoding step on CPU: one fused pass per (row, head) (t5like/kernels).
      ctx_BNH = decode_attention.attend(q_BTNH[:, 0], k, v, bias_BNTS[:, :, 0])
      return self.out(ctx_BNH[:, None].astype(policy.compute_dtype)), new_cache
    if (not cached and decode_attention.wanted_prefill(q_BTNH, k, v)
        and (deterministic or not cfg.dropout_rate)):
      # A prefill (an encoder) on CPU: K/V streamed once per four queries (t5like/kernels).
      ctx_BTNH = decode_attention.attend_prefill(q_BTNH, k, v, bias_BNTS)
      return self.out(ctx_BTNH.astype(policy.compute_dtype)), new_cache
    logits_BNTS = jnp.einsum(f'BTNH,{k_spec}->BNTS', q_BTNH, k.astype(q_BTNH.dtype),
                             preferred_element_type=jnp.float32)
    probs_BNTS = jax.nn.softmax(logits_BNTS + bias_BNTS, axis=-1).astype(policy.compute_dtype)
    probs_BNTS = self.dropout(probs_BNTS, deterministic=deterministic)
    ctx_BTNH = jnp.einsum(f'BNTS,{v_spec}->BTNH', probs_BNTS, v.astype(probs_BNTS.dtype))
    return self.out(ctx_BTNH), new_cache


_AXES = {'B': 'batch', 'N': 'heads', 'S': 'length', 'H': 'kv'}
