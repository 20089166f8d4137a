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
from t5like.models.layers import (MLP, REMAT_POLICIES, Einsum, Embed, RMSNorm, constrain,
                                  policy_of)
from t5like.parallel import pipeline

FULL, STEP, CROSS_KV = 'full', 'step', 'cross_kv'   # modes of a decoder stack


class EncoderLayer(nn.Module):
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, layer_cache, bias_BNTS):
    cfg, det = self.cfg, self.deterministic
    h = RMSNorm(cfg, name='pre_attention_norm')(x_BTD)
    h, _ = Attention(cfg, name='attention')(h, bias_BNTS, det)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    h = MLP(cfg, name='mlp')(RMSNorm(cfg, name='pre_mlp_norm')(x_BTD), det)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    return constrain(x_BTD, ('batch', 'length', 'embed')), None


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention (encoder-decoder only), FFN; pre-norm residuals."""
  cfg: ModelConfig
  deterministic: bool = True
  mode: str = FULL

  @nn.compact
  def __call__(self, x_BTD, layer_cache, self_bias_BNTS, cross_bias_BNTS, encoded_BSD, rope_pos,
               cache_index_B):
    cfg, det = self.cfg, self.deterministic
    cross = cfg.is_encdec
    if cross:
      cross_attention = Attention(cfg, name='cross_attention')
    if self.mode == CROSS_KV:
      k, v = cross_attention.project_kv_cache(encoded_BSD)
      return x_BTD, {'cross_k': k, 'cross_v': v}
    step = self.mode == STEP
    rope_q = rope_k = None
    if cfg.position == 'rope':
      rope_q, rope_k = rope_pos
    new_cache = {}
    h = RMSNorm(cfg, name='pre_self_attention_norm')(x_BTD)
    h, kv = Attention(cfg, name='self_attention')(
        h, self_bias_BNTS, det, rope_q_pos=rope_q, rope_k_pos=rope_k,
        cache=(layer_cache['self_k'], layer_cache['self_v']) if step else None,
        cache_index_B=cache_index_B)
    if step:
      new_cache.update(self_k=kv[0], self_v=kv[1])
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    if cross:
      h = RMSNorm(cfg, name='pre_cross_attention_norm')(x_BTD)
      if step:
        kv = (layer_cache['cross_k'], layer_cache['cross_v'])
        h, _ = cross_attention(h, cross_bias_BNTS, det, kv=kv)
      else:
        h, _ = cross_attention(h, cross_bias_BNTS, det, kv_BSD=encoded_BSD)
      x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    h = MLP(cfg, name='mlp')(RMSNorm(cfg, name='pre_mlp_norm')(x_BTD), det)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h, deterministic=det)
    return constrain(x_BTD, ('batch', 'length', 'embed')), (new_cache if step else None)


class LayerGroup(nn.Module):
  """One set of layer weights applied `repeats` times (cross-layer sharing when repeats > 1)."""
  cfg: ModelConfig
  layer_cls: Any
  repeats: int
  layer_kwargs: tuple = ()

  @nn.compact
  def __call__(self, x, group_cache, *args):
    layer = self.layer_cls(self.cfg, name='layer', **dict(self.layer_kwargs))
    outs = []
    unrolled = group_cache is not None and _is_unrolled(group_cache)
    for r in range(self.repeats):
      if group_cache is None:
        layer_cache = None
      elif unrolled:
        layer_cache = {k: v[r] for k, v in group_cache.items()}
      else:
        layer_cache = jax.tree.map(lambda c: c[r], group_cache)
      x, out = layer(x, layer_cache, *args)
      outs.append(out)
    if outs[0] is None:
      return x, None
    if unrolled:
      return x, {k: [o[k] for o in outs] for k in outs[0]}
    return x, jax.tree.map(lambda *o: jnp.stack(o), *outs)


class LayerStack(nn.Module):
  """`num_layers` layers as one nn.scan over G weight groups (leading 'layers' param axis)."""
  cfg: ModelConfig
  layer_cls: Any
  num_layers: int
  layer_kwargs: tuple = ()

  @nn.compact
  def __call__(self, x, cache, *broadcast_args):
    cfg = self.cfg
    G = cfg.shared_layer_groups or self.num_layers
    R = self.num_layers // G
    group_cls = LayerGroup
    policy = REMAT_POLICIES.get(cfg.remat_policy, 'unknown')
    if policy == 'unknown':
      raise ValueError(f'unknown model.remat_policy {cfg.remat_policy!r}; '
                       f'choose one of {sorted(REMAT_POLICIES)}')
    if cfg.remat_policy != 'none':
      group_cls = nn.remat(LayerGroup, policy=policy, prevent_cse=False)
    if _params_unrolled(self):
      return self._unrolled(G, R, x, cache, broadcast_args)
    if cache is not None and _is_unrolled(cache):
      raise ValueError('a per-layer decoding cache needs per-layer weights: pass the parameters '
                       'through unroll_params (decode.prepare_params) first')
    scanned = nn.scan(group_cls, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                          'dropout': True},
                      in_axes=(0,) + (nn.broadcast,) * len(broadcast_args), length=G,
                      metadata_params={nn.PARTITION_NAME: 'layers'},
                      # Decoding steps unroll the layers: static weight slices, no loop overhead.
                      unroll=G if dict(self.layer_kwargs).get('mode') == STEP else 1)
    piped = pipeline.maybe_pipeline(self, group_cls(cfg, self.layer_cls, R, self.layer_kwargs,
                                                    parent=None), x, cache, broadcast_args)
    if piped is not None:   # a pipeline over the mesh's 'stage' axis (t5like/parallel/pipeline.py)
      return piped, None
    if cache is not None:
      cache = jax.tree.map(lambda c: c.reshape((G, R) + c.shape[1:]), cache)
    x, out = scanned(cfg, self.layer_cls, R, self.layer_kwargs, name='layers')(
        x, cache, *broadcast_args)
    if out is not None:
      out = jax.tree.map(lambda c: c.reshape((G * R,) + c.shape[2:]), out)
    return x, out

  def _unrolled(self, G, R, x, cache, broadcast_args):
    """Per-group weights (`unroll_params`); the cache (if any) comes back as per-layer lists."""
    if cache is not None:
      cache = {k: list(v) for k, v in cache.items()}   # a stacked cache is split here
    outs = {}
    for g in range(G):
      group_cache = None if cache is None else {k: v[g * R:(g + 1) * R] for k, v in cache.items()}
      x, out = LayerGroup(self.cfg, self.layer_cls, R, self.layer_kwargs, name=f'group_{g}')(
          x, group_cache, *broadcast_args)
      for k, v in (out or {}).items():
        outs.setdefault(k, []).extend(v if isinstance(v, list) else list(v))
    return x, (outs or None)


def _params_unrolled(stack: nn.Module) -> bool:
  return 'group_0' in stack.variables.get('params', {})


def _is_unrolled(cache) -> bool:
  return isinstance(cache.get('self_v'), (list, tuple))


def unroll_params(cfg: ModelConfig, params, encoder: bool = False):
  """The decoding layout of the parameters: the decoder's stacked [G, ...] layer weights split into
  one subtree per group (`decoder/stack/group_g`), and with `encoder` the encoder's as well.
  Idempotent; everything else is unchanged.

  Inside a `lax.while_loop` body, slicing layer l out of stacked weights is a copy of it on every
  step (XLA does not hoist it), so a decoding loop reads about twice the weight bytes it needs.
  Split once (a server at load time, `decode.prepare_params`) and each layer is its own buffer
  (for the encoder, run once per request, that saves the per-layer slice copies of a prefill).
  Every mode of either stack accepts both layouts and gives the same results.
  """
  stacks = [('decoder', cfg.num_decoder_layers)]
  if encoder and 'encoder' in params:
    stacks.append(('encoder', cfg.num_encoder_layers))
  stacks = [(name, n) for name, n in stacks if 'layers' in params[name]['stack']]
  if not stacks:
    return params
  params = dict(params)
  for name, layers in stacks:
    G = cfg.shared_layer_groups or layers
    stack = params[name]['stack']
    groups = {f'group_{g}': jax.tree.map(lambda w, g=g: w[g], stack['layers']) for g in range(G)}
    stack = {k: v for k, v in stack.items() if k != 'layers'} | groups
    params[name] = dict(params[name], stack=stack)
  return params


def unroll_for_decoding(cfg: ModelConfig, params, cache):
  """`unroll_params` plus the cache's K/V as per-layer lists, which a decoding loop then updates
  in place (a stacked cache would be sliced, i.e. copied, per layer and step)."""
  cache = dict(cache, **{k: list(cache[k]) for k in _LAYER_CACHE if k in cache})
  return unroll_params(cfg, params), cache


_LAYER_CACHE = ('self_k', 'self_v', 'cross_k', 'cross_v')


def _positions(tokens_BT):
  B, T = tokens_BT.shape
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _segment_mask(q_seg_BT, k_seg_BS):
  return q_seg_BT[:, :, None] == k_seg_BS[:, None, :]


class Encoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, embed: Embed, tokens_BS, segment_ids_BS=None, deterministic=True):
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
    x, _ = LayerStack(cfg, EncoderLayer, cfg.num_encoder_layers,
                      (('deterministic', deterministic),), name='stack')(x, None, bias_BNSS)
    x = RMSNorm(cfg, name='final_norm')(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """The decoder stack and output layer. One compact `__call__`, three modes:

  FULL: teacher-forced forward -> logits [B, T, V] (float32);
  STEP: append T tokens per row at the row's cache index -> (logits, new cache);
  CROSS_KV: cross-attention keys [L, B, N, H, S] and values [L, B, N, S, H] of every layer.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, embed: Embed, tokens_BT, *, mode=FULL, encoded_BSD=None, cross_mask_BTS=None,
               segment_ids_BT=None, positions_BT=None, cache=None, deterministic=True):
    cfg = self.cfg
    kwargs = (('deterministic', deterministic), ('mode', mode))
    stack = LayerStack(cfg, DecoderLayer, cfg.num_decoder_layers, kwargs, name='stack')
    relpos = (RelativePositionBias(cfg, bidirectional=False, name='relpos_bias')
              if cfg.position == 'relative' else None)

    def self_bias(q_pos_BT, k_pos_BS, mask_BTS):
      bias = mask_to_bias(mask_BTS)
      return bias if relpos is None else bias + relpos(q_pos_BT, k_pos_BS)

    if mode == CROSS_KV:
      B = encoded_BSD.shape[0]
      dummy = jnp.zeros((B, 1, cfg.d_model), encoded_BSD.dtype)
      _, kv = stack(dummy, None, None, None, encoded_BSD, None, None)
      return kv

    if mode == FULL:
      pos_BT = _positions(tokens_BT)
      mask_BTT = pos_BT[:, :, None] >= pos_BT[:, None, :]
      if segment_ids_BT is not None:
        mask_BTT = mask_BTT & _segment_mask(segment_ids_BT, segment_ids_BT)
      bias = self_bias(pos_BT[:1], pos_BT[:1], mask_BTT)
      cross_bias = None if cross_mask_BTS is None else mask_to_bias(cross_mask_BTS)
      rope_pos_BT = pos_BT if positions_BT is None else positions_BT
      x = nn.Dropout(cfg.dropout_rate)(embed(tokens_BT), deterministic=deterministic)
      x = constrain(x, ('batch', 'length', 'embed'))
      x, _ = stack(x, None, bias, cross_bias, encoded_BSD, (rope_pos_BT, rope_pos_BT), None)
      return self._logits(embed, x, deterministic)

    if mode != STEP:
      raise ValueError(f'unknown decoder mode {mode!r}')
    index_B = cache['index']
    B, T = tokens_BT.shape
    S = (cache['self_v'][0].shape[2] if _is_unrolled(cache) else cache['self_v'].shape[3])
    q_pos_BT = index_B[:, None] + jnp.arange(T, dtype=jnp.int32)
    k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    bias = self_bias(q_pos_BT, k_pos_BS, k_pos_BS[:, None, :] <= q_pos_BT[:, :, None])
    cross_bias = None
    layer_cache = {k: cache[k] for k in ('self_k', 'self_v')}
    if cfg.is_encdec:
      enc_mask_BS = cache['encoder_mask']
      cross_bias = mask_to_bias(jnp.broadcast_to(enc_mask_BS[:, None, :],
                                                 (B, T, enc_mask_BS.shape[-1])))
      layer_cache.update(cross_k=cache['cross_k'], cross_v=cache['cross_v'])
    x, new_layer_cache = stack(embed(tokens_BT), layer_cache, bias, cross_bias, None,
                               (q_pos_BT, q_pos_BT), index_B)
    new_cache = dict(cache, **new_layer_cache, index=index_B + T)
    return self._logits(embed, x), new_cache

  def _logits(self, embed: Embed, x_BTD, deterministic=True):
    cfg = self.cfg
    x_BTD = RMSNorm(cfg, name='final_norm')(x_BTD)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=deterministic)  # after the norm, as T5
    if cfg.tie_embeddings:
      logits = embed.attend(x_BTD * (cfg.d_model ** -0.5))
    else:
      logits = Einsum(cfg, 'BTD,DV->BTV', (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                      cfg.d_model ** -0.5, out_f32=True, name='lm_head')(x_BTD)
    return constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


class EncoderDecoder(nn.Module):
  """T5. `__call__(encoder_tokens, decoder_tokens)` -> logits [B, T, V] (float32)."""
  cfg: ModelConfig

  def setup(self):
    self.shared_embedding = Embed(self.cfg)
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
    encoded = self.encode(encoder_tokens)
    kv = self.decoder(self.shared_embedding, None, mode=CROSS_KV, encoded_BSD=encoded)
    dtype = lambda c: (c[0] if isinstance(c, list) else c).dtype
    cast = lambda v, c: ([t.astype(dtype(c)) for t in v] if isinstance(v, list)
                         else v.astype(dtype(c)))
    return dict(cache, **{k: cast(v, cache[k]) for k, v in kv.items()},
                encoder_mask=encoder_tokens != self.cfg.pad_id)

  def decode_step(self, decoder_tokens, cache):
    """Appends tokens [B, T] at each row's cache index: (logits [B, T, V], new cache)."""
    return self.decoder(self.shared_embedding, decoder_tokens, mode=STEP, cache=cache)


class DecoderOnly(nn.Module):
  """A causal language model: `__call__(tokens)` -> logits [B, T, V] (float32)."""
  cfg: ModelConfig

  def setup(self):
    self.shared_embedding = Embed(self.cfg)
    self.decoder = Decoder(self.cfg)

  def __call__(self, decoder_tokens, decoder_segment_ids=None, decoder_positions=None,
               deterministic=True):
    return self.decoder(self.shared_embedding, decoder_tokens, segment_ids_BT=decoder_segment_ids,
                        positions_BT=decoder_positions, deterministic=deterministic)

  def decode_step(self, decoder_tokens, cache):
    """Appends tokens [B, T] at each row's cache index: (logits [B, T, V], new cache)."""
    return self.decoder(self.shared_embedding, decoder_tokens, mode=STEP, cache=cache)


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
