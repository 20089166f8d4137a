"""T5 encoder-decoder (1.0 / 1.1) and decoder-only Transformers, with layers stacked by nn.scan.

Shape letters: B batch, T target length, S source length (or cache length), D d_model,
N heads, H head dim, V vocab, L layers, G layer groups (shared weights), R repeats per group.

Token id 0 is padding in encoder inputs. Decoder inputs start with T5's decoder start id (also 0),
so decoder padding is never inferred from token ids: only segment ids (packing) mask it, and
causality keeps right padding from affecting earlier positions.

Decoding state is an explicit cache pytree (see `init_cache`) rather than a mutable collection:
every row has its own write index, so slots of a batch can be at different positions.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5like.config import ModelConfig
from t5like.models.attention import Attention, RelativePositionBias, mask_to_bias
from t5like.models.layers import (MLP, REMAT_POLICIES, RMSNorm, constrain, einsum_class,
                                  embed_class, policy_of)
from t5like.parallel import pipeline

class EncoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool, bias_BNTS):
    cfg, det = self.cfg, deterministic
    h = RMSNorm(cfg, name='pre_attention_norm')(x_BTD)
    h = Attention(cfg, name='attention')(h, bias_BNTS, det)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    h = MLP(cfg, name='mlp')(RMSNorm(cfg, name='pre_mlp_norm')(x_BTD), det)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    return constrain(x_BTD, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention (encoder-decoder only), FFN; pre-norm residuals.

  `__call__`: a whole sequence (training, scoring); `step`: new positions against the layer's
  KV cache; `cross_kv`: the cross-attention keys and values of an encoder output.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.pre_self_attention_norm = RMSNorm(cfg)
    self.self_attention = Attention(cfg)
    if cfg.is_encdec:
      self.pre_cross_attention_norm = RMSNorm(cfg)
      self.cross_attention = Attention(cfg)
    self.pre_mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg)
    self.attention_dropout = nn.Dropout(cfg.dropout_rate)
    self.cross_dropout = nn.Dropout(cfg.dropout_rate)
    self.mlp_dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x_BTD, deterministic: bool, self_bias_BNTS, cross_bias_BNTS, encoded_BSD,
               rope_pos):
    det = deterministic
    rope_q, rope_k = rope_pos if self.cfg.position == 'rope' else (None, None)
    h = self.self_attention(self.pre_self_attention_norm(x_BTD), self_bias_BNTS, det,
                            rope_q_pos=rope_q, rope_k_pos=rope_k)
    x_BTD = x_BTD + self.attention_dropout(h, deterministic=det)
    if self.cfg.is_encdec:
      h = self.cross_attention(self.pre_cross_attention_norm(x_BTD), cross_bias_BNTS, det,
                               kv_BSD=encoded_BSD)
      x_BTD = x_BTD + self.cross_dropout(h, deterministic=det)
    return self._ffn(x_BTD, det)

  def step(self, x_BTD, layer_cache, self_bias_BNTS, cross_bias_BNTS, rope_pos, index_B):
    """(x, {'self_k', 'self_v'} updated) for T new positions per row at `index_B`."""
    rope_q, rope_k = rope_pos if self.cfg.position == 'rope' else (None, None)
    h, (k, v) = self.self_attention.step(
        self.pre_self_attention_norm(x_BTD), self_bias_BNTS,
        (layer_cache['self_k'], layer_cache['self_v']), index_B, rope_q_pos=rope_q,
        rope_k_pos=rope_k)
    x_BTD = x_BTD + h
    if self.cfg.is_encdec:
      kv = (layer_cache['cross_k'], layer_cache['cross_v'])
      x_BTD = x_BTD + self.cross_attention.cross_step(self.pre_cross_attention_norm(x_BTD),
                                                      cross_bias_BNTS, kv)
    return self._ffn(x_BTD, True), {'self_k': k, 'self_v': v}

  def cross_kv(self, encoded_BSD):
    k, v = self.cross_attention.project_kv_cache(encoded_BSD)
    return {'cross_k': k, 'cross_v': v}

  def _ffn(self, x_BTD, det):
    h = self.mlp(self.pre_mlp_norm(x_BTD), det)
    x_BTD = x_BTD + self.mlp_dropout(h, deterministic=det)
    return constrain(x_BTD, ('batch', 'length', 'embed'))


class LayerGroup(nn.Module):
  """One set of layer weights applied `repeats` times (cross-layer sharing when repeats > 1)."""
  cfg: ModelConfig
  layer_cls: Any
  repeats: int

  def setup(self):
    self.layer = self.layer_cls(self.cfg)

  def __call__(self, x, cache, deterministic: bool, *args):
    """The whole-sequence forward; `cache` is None (the signature pipeline.run_stack calls)."""
    del cache
    for _ in range(self.repeats):
      x = self.layer(x, deterministic, *args)
    return x, None

  def step(self, x, group_cache, *args):
    """`DecoderLayer.step` of each repeat; cache leaves [repeats, ...]."""
    outs = []
    for r in range(self.repeats):
      x, out = self.layer.step(x, jax.tree.map(lambda c, r=r: c[r], group_cache), *args)
      outs.append(out)
    return x, jax.tree.map(lambda *o: jnp.stack(o), *outs)

  def cross_kv(self, x, _, encoded_BSD):
    kv = self.layer.cross_kv(encoded_BSD)
    return x, jax.tree.map(lambda a: jnp.stack([a] * self.repeats), kv)


class LayerStack(nn.Module):
  """`num_layers` layers as one nn.scan over G weight groups (leading 'layers' param axis).

  `__call__` (a whole sequence, any layer class), `step` and `cross_kv` (DecoderLayer's) scan
  the same parameters; caches are [L, ...] per key.
  """
  cfg: ModelConfig
  layer_cls: Any
  num_layers: int

  @property
  def groups(self) -> tuple[int, int]:
    """(G weight groups, R layers per group)."""
    G = self.cfg.shared_layer_groups or self.num_layers
    return G, self.num_layers // G

  def setup(self):
    cfg = self.cfg
    policy = REMAT_POLICIES.get(cfg.remat_policy, 'unknown')
    if policy == 'unknown':
      raise ValueError(f'unknown model.remat_policy {cfg.remat_policy!r}; '
                       f'choose one of {sorted(REMAT_POLICIES)}')
    self.group_cls = LayerGroup
    if cfg.remat_policy != 'none':
      # `deterministic` (argument 3, counting self) is a Python bool.
      self.group_cls = nn.remat(LayerGroup, policy=policy, prevent_cse=False, static_argnums=(3,))
    self.layers = self.group_cls(cfg, self.layer_cls, self.groups[1])

  def _scan(self, body, num_broadcast: int, unroll: int = 1):
    return nn.scan(body, variable_axes={'params': 0},
                   split_rngs={'params': True, 'dropout': True},
                   in_axes=(0,) + (nn.broadcast,) * num_broadcast, length=self.groups[0],
                   metadata_params={nn.PARTITION_NAME: 'layers'}, unroll=unroll)

  def __call__(self, x, *broadcast_args, deterministic: bool = True):
    G, R = self.groups
    group = self.group_cls(self.cfg, self.layer_cls, R, parent=None)
    piped = pipeline.maybe_pipeline(self, group, x, broadcast_args, deterministic)
    if piped is not None:   # a pipeline over the mesh's 'stage' axis (t5like/parallel/pipeline.py)
      return piped
    scan = self._scan(lambda g, x, c, *b: g(x, c, deterministic, *b), len(broadcast_args))
    return scan(self.layers, x, None, *broadcast_args)[0]

  def step(self, x, cache, *broadcast_args):
    """DecoderLayer.step through every layer: (x, the updated cache entries [L, ...])."""
    G, R = self.groups
    cache = jax.tree.map(lambda c: c.reshape((G, R) + c.shape[1:]), cache)
    # Decoding steps unroll the layers: static weight slices, no loop overhead.
    scan = self._scan(lambda g, x, c, *b: g.step(x, c, *b), len(broadcast_args), unroll=G)
    x, out = scan(self.layers, x, cache, *broadcast_args)
    return x, jax.tree.map(lambda c: c.reshape((G * R,) + c.shape[2:]), out)

  def cross_kv(self, encoded_BSD):
    """Cross-attention keys [L, B, N, H, S] and values [L, B, N, S, H] of every layer."""
    G, R = self.groups
    scan = self._scan(lambda g, x, c, e: g.cross_kv(x, c, e), 1)
    _, kv = scan(self.layers, jnp.zeros((), encoded_BSD.dtype), None, encoded_BSD)
    return jax.tree.map(lambda c: c.reshape((G * R,) + c.shape[2:]), kv)


def _positions(tokens_BT):
  B, T = tokens_BT.shape
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _segment_mask(q_seg_BT, k_seg_BS):
  return q_seg_BT[:, :, None] == k_seg_BS[:, None, :]


class Encoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, embed: nn.Module, tokens_BS, segment_ids_BS=None, deterministic=True):
    cfg = self.cfg
    key_valid_BS = tokens_BS != cfg.pad_id if segment_ids_BS is None else segment_ids_BS != 0
    mask_BSS = jnp.broadcast_to(key_valid_BS[:, None, :], tokens_BS.shape + tokens_BS.shape[-1:])
    if segment_ids_BS is not None:
      mask_BSS = mask_BSS & _segment_mask(segment_ids_BS, segment_ids_BS)
    pos_BS = _positions(tokens_BS)[:1]
    bias_BNSS = RelativePositionBias(cfg, bidirectional=True, name='relpos_bias')(pos_BS, pos_BS)
    bias_BNSS = bias_BNSS + mask_to_bias(mask_BSS)
    x = nn.Dropout(cfg.dropout_rate)(embed(tokens_BS), deterministic=deterministic)
    x = constrain(x, ('batch', 'length', 'embed'))
    x = LayerStack(cfg, EncoderLayer, cfg.num_encoder_layers, name='stack')(
        x, bias_BNSS, deterministic=deterministic)
    x = RMSNorm(cfg, name='final_norm')(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """The decoder stack and output layer, one method per mode:

  `__call__`: teacher-forced forward -> logits [B, T, V] (float32);
  `step`: append T tokens per row at the row's cache index -> (logits, new cache);
  `cross_kv`: cross-attention keys [L, B, N, H, S] and values [L, B, N, S, H] of every layer.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.stack = LayerStack(cfg, DecoderLayer, cfg.num_decoder_layers)
    if cfg.position == 'relative':
      self.relpos_bias = RelativePositionBias(cfg, bidirectional=False)
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = einsum_class(cfg)(cfg, 'BTD,DV->BTV', (cfg.d_model, cfg.vocab_size),
                                       ('embed', 'vocab'), cfg.d_model ** -0.5, out_f32=True)
    self.input_dropout = nn.Dropout(cfg.dropout_rate)
    self.output_dropout = nn.Dropout(cfg.dropout_rate)

  def _self_bias(self, q_pos_BT, k_pos_BS, mask_BTS):
    bias = mask_to_bias(mask_BTS)
    return bias if self.cfg.position != 'relative' else bias + self.relpos_bias(q_pos_BT, k_pos_BS)

  def __call__(self, embed: nn.Module, tokens_BT, *, encoded_BSD=None, cross_mask_BTS=None,
               segment_ids_BT=None, positions_BT=None, deterministic=True):
    pos_BT = _positions(tokens_BT)
    mask_BTT = pos_BT[:, :, None] >= pos_BT[:, None, :]
    if segment_ids_BT is not None:
      mask_BTT = mask_BTT & _segment_mask(segment_ids_BT, segment_ids_BT)
    bias = self._self_bias(pos_BT[:1], pos_BT[:1], mask_BTT)
    cross_bias = None if cross_mask_BTS is None else mask_to_bias(cross_mask_BTS)
    rope_pos_BT = pos_BT if positions_BT is None else positions_BT
    x = self.input_dropout(embed(tokens_BT), deterministic=deterministic)
    x = constrain(x, ('batch', 'length', 'embed'))
    x = self.stack(x, bias, cross_bias, encoded_BSD, (rope_pos_BT, rope_pos_BT),
                   deterministic=deterministic)
    return self._logits(embed, x, deterministic)

  def step(self, embed: nn.Module, tokens_BT, cache):
    """(logits [B, T, V], new cache): tokens appended at each row's `cache['index']`."""
    cfg = self.cfg
    index_B = cache['index']
    B, T = tokens_BT.shape
    S = jax.tree.leaves(cache['self_v'])[0].shape[-2]   # values [..., B, N, S, H]
    q_pos_BT = index_B[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    bias = self._self_bias(q_pos_BT, k_pos_BS, k_pos_BS[:, None, :] <= q_pos_BT[:, :, None])
    cross_bias = None
    layer_cache = {k: cache[k] for k in ('self_k', 'self_v')}
    if cfg.is_encdec:
      enc_mask_BS = cache['encoder_mask']
      cross_bias = mask_to_bias(jnp.broadcast_to(enc_mask_BS[:, None, :],
                                                 (B, T, enc_mask_BS.shape[-1])))
      layer_cache.update(cross_k=cache['cross_k'], cross_v=cache['cross_v'])
    x, new_layer_cache = self.stack.step(embed(tokens_BT), layer_cache, bias, cross_bias,
                                         (q_pos_BT, q_pos_BT), index_B)
    new_cache = dict(cache, **new_layer_cache, index=index_B + T)
    return self._logits(embed, x), new_cache

  def cross_kv(self, encoded_BSD):
    return self.stack.cross_kv(encoded_BSD)

  def _logits(self, embed: nn.Module, x_BTD, deterministic=True):
    cfg = self.cfg
    x_BTD = self.final_norm(x_BTD)
    x_BTD = self.output_dropout(x_BTD, deterministic=deterministic)  # after the norm, as T5
    if cfg.tie_embeddings:
      logits = embed.attend(x_BTD * (cfg.d_model ** -0.5))
    else:
      logits = self.lm_head(x_BTD)
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


class EncoderDecoder(nn.Module):
  """T5. `__call__(encoder_tokens, decoder_tokens)` -> logits [B, T, V] (float32); decoding:
  `prefill(encoder_tokens, cache)` then `decode_step(decoder_tokens, cache)`."""
  cfg: ModelConfig

  def setup(self):
    self.shared_embedding = embed_class(self.cfg)(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def encode(self, encoder_tokens, encoder_segment_ids=None, deterministic=True):
    return self.encoder(self.shared_embedding, encoder_tokens, encoder_segment_ids, deterministic)

  def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
               deterministic=True):
    del encoder_positions  # relative positions follow from token order within each segment
    encoded = self.encode(encoder_tokens, encoder_segment_ids, deterministic)
    key_valid_BS = (encoder_tokens != self.cfg.pad_id if encoder_segment_ids is None
                    else encoder_segment_ids != 0)
    B, T = decoder_tokens.shape
    cross_mask = jnp.broadcast_to(key_valid_BS[:, None, :], (B, T, key_valid_BS.shape[-1]))
    if decoder_segment_ids is not None and encoder_segment_ids is not None:
      cross_mask = cross_mask & _segment_mask(decoder_segment_ids, encoder_segment_ids)
    return self.decoder(self.shared_embedding, decoder_tokens, encoded_BSD=encoded,
                        cross_mask_BTS=cross_mask, segment_ids_BT=decoder_segment_ids,
                        positions_BT=decoder_positions, deterministic=deterministic)

  def prefill(self, encoder_tokens, cache):
    """Runs the encoder and stores its cross-attention K/V and padding mask in `cache`."""
    kv = self.decoder.cross_kv(self.encode(encoder_tokens))
    kv = {k: jax.tree.map(lambda v, c: v.astype(c.dtype), v, cache[k]) for k, v in kv.items()}
    return dict(cache, **kv, encoder_mask=encoder_tokens != self.cfg.pad_id)

  def decode_step(self, decoder_tokens, cache):
    """Appends tokens [B, T] at each row's cache index: (logits [B, T, V], new cache)."""
    return self.decoder.step(self.shared_embedding, decoder_tokens, cache)


class DecoderOnly(nn.Module):
  """A causal language model: `__call__(tokens)` -> logits [B, T, V] (float32); decoding:
  `decode_step(tokens, cache)` (a prompt is its first step)."""
  cfg: ModelConfig

  def setup(self):
    self.shared_embedding = embed_class(self.cfg)(self.cfg)
    self.decoder = Decoder(self.cfg)

  def __call__(self, decoder_tokens, decoder_segment_ids=None, decoder_positions=None,
               deterministic=True):
    return self.decoder(self.shared_embedding, decoder_tokens, segment_ids_BT=decoder_segment_ids,
                        positions_BT=decoder_positions, deterministic=deterministic)

  def decode_step(self, decoder_tokens, cache):
    """Appends tokens [B, T] at each row's cache index: (logits [B, T, V], new cache)."""
    return self.decoder.step(self.shared_embedding, decoder_tokens, cache)


def build_model(cfg: ModelConfig) -> nn.Module:
  return EncoderDecoder(cfg) if cfg.is_encdec else DecoderOnly(cfg)


def init_cache(cfg: ModelConfig, batch: int, max_decode_len: int, encoder_len: int = 0):
  """An empty decoding cache: per-row write index, keys [L, B, N, H, S], values [L, B, N, S, H]."""
  dtype = policy_of(cfg).compute_dtype
  L, N, H = cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim
  cache = {'index': jnp.zeros((batch,), jnp.int32),
           'self_k': jnp.zeros((L, batch, N, H, max_decode_len), dtype),
           'self_v': jnp.zeros((L, batch, N, max_decode_len, H), dtype)}
  if cfg.is_encdec:
    cache.update(cross_k=jnp.zeros((L, batch, N, H, encoder_len), dtype),
                 cross_v=jnp.zeros((L, batch, N, encoder_len, H), dtype),
                 encoder_mask=jnp.zeros((batch, encoder_len), bool))
  return cache


def dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8):
  tokens = jnp.ones((batch, length), jnp.int32)
  return (tokens, tokens) if cfg.is_encdec else (tokens,)


def init_params(cfg: ModelConfig, rng, batch: int = 1, length: int = 8):
  """Initialised parameters (boxed logical-partitioning metadata removed), jitted."""
  return _init_params(cfg, rng, batch, length)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_params(cfg, rng, batch, length):
  variables = build_model(cfg).init(rng, *dummy_inputs(cfg, batch, length))
  return nn.unbox(variables['params'])


def abstract_params(cfg: ModelConfig):
  """Parameter shapes and dtypes without allocating them (jax.eval_shape)."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
