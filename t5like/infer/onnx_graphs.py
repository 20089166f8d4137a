"""ONNX graphs of the encoder and of one decoder step, built from the parameter pytree.

Shape letters: B batch, T new tokens, S source length, C cache length, D d_model, N heads,
H head dim, F d_ff, V vocab, L decoder layers, K relative position buckets.

  encoder_graph(cfg, params)   input_ids [B, S] -> cross_k_l [B, N, H, S], cross_v_l [B, N, S, H]
  decoder_graph(cfg, params)   input_ids [B, T], cache_index [B], (encoder_attention_mask [B, S],
                               cross_k_l, cross_v_l), past_k_l [B, N, H, C], past_v_l [B, N, C, H]
                               -> logits [B, T, V] (float32), present_k_l, present_v_l

Every dimension above is dynamic (ONNX Runtime accepts any batch, source, cache length and number
of new tokens, so no shape buckets): one decoder graph runs both a decoder-only model's prompt
prefill (T = prompt length) and the one-token steps (T = 1). The cache layouts are the model's
(keys [B, N, H, C], values [B, N, C, H]); each row writes its T new keys and values at its own
`cache_index` (ScatterElements, the model's per-row `write_cache`) and attends to cache
positions <= its query position, so rows of a batch may be at different positions, exactly as in
`t5like.models.transformer.Decoder` (stale entries past a row's index stay masked until rewritten).
Writes past the cache's end are an error in ONNX Runtime: allocate prompt + new tokens.

The graphs mirror `t5like.models` op for op, in float32 (any `model.precision` exports as f32):
T5 LayerNorm (mean of squares, no bias), unscaled attention logits plus an additive bias (-1e10
for masked positions, T5's relative position bias), softmax, relu / tanh-gelu / silu FFNs (gated
for T5 1.1), tied output layer scaled by d_model**-0.5 or an lm_head, RoPE (rotate-half). The
relative position bucket of every offset in [-R, R] (R = 2 * max_distance; offsets beyond clip to
the same bucket) is computed by the model's own `relative_position_bucket` at export and stored
with the learned bias as one [2R+1, N] table that the graph gathers from, so float rounding at
bucket boundaries cannot differ. q/k/v (and the gated FFN's two inputs, and the cross-attention
K/V of all layers) are concatenated into one MatMul each.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from t5like.config import ModelConfig
from t5like.models.attention import NEG_INF, relative_position_bucket

OPSET = 17
F32, I64 = TensorProto.FLOAT, TensorProto.INT64


class OnnxExportError(ValueError):
  """The model uses something these graphs cannot express; the message names it and the field."""


# (config field, value that cannot be exported, the operation it selects, how to export instead)
_UNSUPPORTED = (
    ('weights', lambda v: v != 'none', 'quantised einsum (integer kernels, qkernel/qscale)',
     'export the float model and quantise the graphs with ONNX Runtime (--int8)'),
    ('activations', lambda v: v != 'none', 'run-time int8 activation quantisation '
     '(dynamic_einsum)', 'export with quant.activations=none and quantise the graphs (--int8)'),
    ('qat', lambda v: v != 'none', 'fake-quantised kernels (fake_quant_kernel)',
     'export the trained float weights with quant.qat=none'),
)


def check_exportable(cfg: ModelConfig) -> None:
  for field, bad, op, fix in _UNSUPPORTED:
    value = getattr(cfg.quant, field)
    if bad(value):
      raise OnnxExportError(f'model {cfg.name!r}: the ONNX exporter cannot express the {op} that '
                            f'model.quant.{field}={value!r} selects; {fix}')


class _Graph:
  """A growing ONNX graph: `op` appends a node and returns its output name."""

  def __init__(self, name: str):
    self.name = name
    self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
    self._count = 0

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def const(self, value, name: str | None = None) -> str:
    name = name or self.fresh('const')
    self.inits.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def i64(self, *values) -> str:
    return self.const(np.asarray(values, np.int64))

  def f32(self, value) -> str:
    return self.const(np.asarray(value, np.float32))

  def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
    """Appends a node; its output is `name` (a graph output) or a fresh name."""
    names = [name] if name else [self.fresh(op_type.lower()) for _ in range(outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
    return names[0] if outputs == 1 else names

  def add_input(self, name: str, elem, shape) -> str:
    self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
    return name

  def add_output(self, name: str, elem, shape) -> None:
    self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

  def model(self) -> onnx.ModelProto:
    graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)],
                          producer_name='t5like')
    m.ir_version = 8   # what ONNX Runtime reads for opset 17
    return m


# ---- parameters --------------------------------------------------------------------------------

def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def layer_params(cfg: ModelConfig, params: Mapping, stack: str, layer: int) -> dict:
  """The weights of layer `layer` of `stack` ('encoder' / 'decoder') as a nested dict of numpy
  arrays, from the training layout (stacked [G, ...]) or the decoding one (`group_g`)."""
  n = cfg.num_encoder_layers if stack == 'encoder' else cfg.num_decoder_layers
  G = cfg.shared_layer_groups or n
  g = layer // (n // G)
  s = params[stack]['stack']
  if 'layers' in s:
    return _map(lambda w: w[g], s['layers']['layer'])
  return _map(lambda w: w, s[f'group_{g}']['layer'])


def _map(fn, tree):
  return {k: _map(fn, v) if isinstance(v, Mapping) else _np(fn(v)) for k, v in tree.items()}


def _in_out(w, contract_dims: int) -> np.ndarray:
  """An Einsum kernel ([D, N, H], [N, H, D], [D, F]) as the 2-D [in, out] matrix of a MatMul."""
  w = _np(w)
  return w.reshape(int(np.prod(w.shape[:contract_dims])), -1)


def relative_bias_table(cfg: ModelConfig, rel_embedding_NK, bidirectional: bool):
  """(table [2R+1, N], R): the bias of every key-minus-query offset in [-R, R]."""
  R = 2 * cfg.relative_attention_max_distance
  offsets = jnp.arange(-R, R + 1, dtype=jnp.int32)
  bucket = np.asarray(relative_position_bucket(offsets, bidirectional,
                                               cfg.relative_attention_num_buckets,
                                               cfg.relative_attention_max_distance))
  return _np(rel_embedding_NK).T[bucket], R


# ---- building blocks ----------------------------------------------------------------------------

def _rms_norm(g: _Graph, x: str, scale, eps: float, name: str) -> str:
  var = g.op('ReduceMean', g.op('Mul', x, x), axes=[-1], keepdims=1)
  y = g.op('Div', x, g.op('Sqrt', g.op('Add', var, g.f32(eps))))
  return g.op('Mul', y, g.const(_np(scale), name))


def _matmul(g: _Graph, x: str, w: np.ndarray, name: str, out: str | None = None) -> str:
  return g.op('MatMul', x, g.const(w, name), name=out)


def _heads(g: _Graph, x_BTX: str, cfg: ModelConfig) -> str:
  return g.op('Reshape', x_BTX, g.i64(0, 0, cfg.num_heads, cfg.head_dim))


def _merge_heads(g: _Graph, ctx_BNTH: str, cfg: ModelConfig) -> str:
  ctx_BTNH = g.op('Transpose', ctx_BNTH, perm=[0, 2, 1, 3])
  return g.op('Reshape', ctx_BTNH, g.i64(0, 0, cfg.num_heads * cfg.head_dim))


def _attend(g: _Graph, q_BTNH: str, k_BNHS: str, v_BNSH: str, bias: str) -> str:
  """softmax(q k + bias) v -> context [B, N, T, H] (T5: logits not scaled)."""
  q_BNTH = g.op('Transpose', q_BTNH, perm=[0, 2, 1, 3])
  logits_BNTS = g.op('Add', g.op('MatMul', q_BNTH, k_BNHS), bias)
  return g.op('MatMul', g.op('Softmax', logits_BNTS, axis=-1), v_BNSH)


def _act(g: _Graph, x: str, kind: str) -> str:
  if kind == 'relu':
    return g.op('Relu', x)
  if kind == 'silu':
    return g.op('Mul', x, g.op('Sigmoid', x))
  # tanh-approximate gelu, as flax's nn.gelu (and T5 / HF) compute it
  inner = g.op('Mul', g.op('Add', x, g.op('Mul', g.f32(0.044715), g.op('Pow', x, g.f32(3.0)))),
               g.f32(np.sqrt(2.0 / np.pi)))
  return g.op('Mul', g.op('Mul', x, g.f32(0.5)), g.op('Add', g.f32(1.0), g.op('Tanh', inner)))


def _mlp(g: _Graph, x: str, p: Mapping, cfg: ModelConfig, name: str) -> str:
  if cfg.ffn_activation in ('gated-gelu', 'swiglu'):
    w = np.concatenate([_np(p['wi_0']['kernel']), _np(p['wi_1']['kernel'])], axis=1)
    gate, up = g.op('Split', _matmul(g, x, w, f'{name}/wi_01'), g.i64(cfg.d_ff, cfg.d_ff),
                    axis=-1, outputs=2)
    h = g.op('Mul', _act(g, gate, 'gelu' if cfg.ffn_activation == 'gated-gelu' else 'silu'), up)
  else:
    h = _act(g, _matmul(g, x, _np(p['wi']['kernel']), f'{name}/wi'),
             'relu' if cfg.ffn_activation == 'relu' else 'gelu')
  return _matmul(g, h, _np(p['wo']['kernel']), f'{name}/wo')


def _qkv(g: _Graph, h: str, p: Mapping, cfg: ModelConfig, name: str):
  """q, k, v [B, T, N, H] from one MatMul against the concatenated kernels."""
  w = np.concatenate([_in_out(p[k]['kernel'], 1) for k in ('query', 'key', 'value')], axis=1)
  NH = cfg.num_heads * cfg.head_dim
  q, k, v = g.op('Split', _matmul(g, h, w, f'{name}/qkv'), g.i64(NH, NH, NH), axis=-1, outputs=3)
  return _heads(g, q, cfg), _heads(g, k, cfg), _heads(g, v, cfg)


def _out(g: _Graph, ctx_BNTH: str, p: Mapping, cfg: ModelConfig, name: str) -> str:
  return _matmul(g, _merge_heads(g, ctx_BNTH, cfg), _in_out(p['out']['kernel'], 2), f'{name}/out')


def _relative_bias(g: _Graph, rel: str, table, R: int, perm) -> str:
  """Gathers the bias of key-minus-query offsets `rel` from the [2R+1, N] table, heads moved by
  `perm`."""
  idx = g.op('Add', g.op('Clip', rel, g.const(np.int64(-R)), g.const(np.int64(R))),
             g.const(np.int64(R)))
  return g.op('Transpose', g.op('Gather', g.const(table, 'relpos_bias_table'), idx), perm=perm)


def _rope(g: _Graph, x_BTNH: str, sin: str, cos: str, cfg: ModelConfig) -> str:
  half = cfg.head_dim // 2
  x1, x2 = g.op('Split', x_BTNH, g.i64(half, half), axis=-1, outputs=2)
  return g.op('Concat', g.op('Sub', g.op('Mul', x1, cos), g.op('Mul', x2, sin)),
              g.op('Add', g.op('Mul', x2, cos), g.op('Mul', x1, sin)), axis=-1)


def _mask_bias(g: _Graph, allowed: str) -> str:
  return g.op('Where', allowed, g.f32(0.0), g.f32(NEG_INF))


# ---- the two graphs ------------------------------------------------------------------------------

def cache_names(cfg: ModelConfig):
  """Per decoder layer: (past key, past value, present key, present value, cross key,
  cross value)."""
  return [(f'past_key_{l}', f'past_value_{l}', f'present_key_{l}', f'present_value_{l}',
           f'cross_key_{l}', f'cross_value_{l}') for l in range(cfg.num_decoder_layers)]


def encoder_graph(cfg: ModelConfig, params: Mapping[str, Any]) -> onnx.ModelProto:
  """Encoder plus every decoder layer's cross-attention keys and values."""
  check_exportable(cfg)
  g = _Graph('t5like_encoder')
  N, H, L = cfg.num_heads, cfg.head_dim, cfg.num_decoder_layers
  ids = g.add_input('input_ids', I64, ['batch', 'source'])
  emb = _np(params['shared_embedding']['embedding'])
  x = g.op('Gather', g.const(emb, 'embedding'), ids)
  valid_B11S = g.op('Unsqueeze', g.op('Not', g.op('Equal', ids, g.const(np.int64(cfg.pad_id)))),
                    g.i64(1, 2))
  S = g.op('Gather', g.op('Shape', ids), g.i64(1))
  pos = g.op('Range', g.const(np.int64(0)), g.op('Squeeze', S), g.const(np.int64(1)))
  rel_SS = g.op('Sub', g.op('Unsqueeze', pos, g.i64(0)), g.op('Unsqueeze', pos, g.i64(1)))
  table, R = relative_bias_table(cfg, params['encoder']['relpos_bias']['rel_embedding'], True)
  bias_1NSS = g.op('Unsqueeze', _relative_bias(g, rel_SS, table, R, [2, 0, 1]), g.i64(0))
  bias = g.op('Add', bias_1NSS, _mask_bias(g, valid_B11S))
  for l in range(cfg.num_encoder_layers):
    p, name = layer_params(cfg, params, 'encoder', l), f'encoder/layer_{l}'
    h = _rms_norm(g, x, p['pre_attention_norm']['scale'], cfg.layer_norm_epsilon,
                  f'{name}/pre_attention_norm')
    q, k, v = _qkv(g, h, p['attention'], cfg, f'{name}/attention')
    ctx = _attend(g, q, g.op('Transpose', k, perm=[0, 2, 3, 1]),
                  g.op('Transpose', v, perm=[0, 2, 1, 3]), bias)
    x = g.op('Add', x, _out(g, ctx, p['attention'], cfg, f'{name}/attention'))
    h = _rms_norm(g, x, p['pre_mlp_norm']['scale'], cfg.layer_norm_epsilon, f'{name}/pre_mlp_norm')
    x = g.op('Add', x, _mlp(g, h, p['mlp'], cfg, f'{name}/mlp'))
  enc = _rms_norm(g, x, params['encoder']['final_norm']['scale'], cfg.layer_norm_epsilon,
                  'encoder/final_norm')
  # Cross-attention K and V of all decoder layers: one MatMul, then split per layer.
  kernels = []
  for l in range(L):
    p = layer_params(cfg, params, 'decoder', l)['cross_attention']
    kernels += [_in_out(p['key']['kernel'], 1), _in_out(p['value']['kernel'], 1)]
  kv = g.op('Split', _matmul(g, enc, np.concatenate(kernels, axis=1), 'decoder/cross_kv'),
            g.i64(*[N * H] * 2 * L), axis=-1, outputs=2 * L)
  kv = [kv] if isinstance(kv, str) else kv
  for l, names in enumerate(cache_names(cfg)):
    k_BSNH, v_BSNH = _heads(g, kv[2 * l], cfg), _heads(g, kv[2 * l + 1], cfg)
    g.op('Transpose', k_BSNH, perm=[0, 2, 3, 1], name=names[4])
    g.op('Transpose', v_BSNH, perm=[0, 2, 1, 3], name=names[5])
    g.add_output(names[4], F32, ['batch', N, H, 'source'])
    g.add_output(names[5], F32, ['batch', N, 'source', H])
  return g.model()


def decoder_graph(cfg: ModelConfig, params: Mapping[str, Any]) -> onnx.ModelProto:
  """T new tokens per row written at the row's cache index; logits of each and the new cache."""
  check_exportable(cfg)
  g = _Graph('t5like_decoder')
  N, H = cfg.num_heads, cfg.head_dim
  names = cache_names(cfg)
  ids = g.add_input('input_ids', I64, ['batch', 'new'])
  index_B = g.add_input('cache_index', I64, ['batch'])
  if cfg.is_encdec:
    enc_mask = g.add_input('encoder_attention_mask', I64, ['batch', 'source'])
  for past_k, past_v, *_ in names:
    g.add_input(past_k, F32, ['batch', N, H, 'cache'])
    g.add_input(past_v, F32, ['batch', N, 'cache', H])
  if cfg.is_encdec:
    for *_, cross_k, cross_v in names:
      g.add_input(cross_k, F32, ['batch', N, H, 'source'])
      g.add_input(cross_v, F32, ['batch', N, 'source', H])
  emb = _np(params['shared_embedding']['embedding'])
  x = g.op('Gather', g.const(emb, 'embedding'), ids)
  # Query positions [B, T] = index + t; key positions [C] = 0..C-1.
  ids_shape = g.op('Shape', ids)
  T = g.op('Squeeze', g.op('Gather', ids_shape, g.i64(1)))
  zero, one = g.const(np.int64(0)), g.const(np.int64(1))
  q_pos_BT = g.op('Add', g.op('Unsqueeze', index_B, g.i64(1)),
                  g.op('Unsqueeze', g.op('Range', zero, T, one), g.i64(0)))
  C = g.op('Squeeze', g.op('Gather', g.op('Shape', names[0][1]), g.i64(2)))
  k_pos_11C = g.op('Unsqueeze', g.op('Range', zero, C, one), g.i64(0, 1))
  q_pos_BT1 = g.op('Unsqueeze', q_pos_BT, g.i64(2))
  bias = g.op('Unsqueeze', _mask_bias(g, g.op('LessOrEqual', k_pos_11C, q_pos_BT1)), g.i64(1))
  if cfg.position == 'relative':
    table, R = relative_bias_table(cfg, params['decoder']['relpos_bias']['rel_embedding'], False)
    bias = g.op('Add', bias, _relative_bias(g, g.op('Sub', k_pos_11C, q_pos_BT1), table, R,
                                            [0, 3, 1, 2]))
  sin = cos = None
  if cfg.position == 'rope':
    freq = cfg.rope_max_wavelength ** (-np.arange(0, H, 2, dtype=np.float32) / H)
    angle = g.op('Mul', g.op('Unsqueeze', g.op('Cast', q_pos_BT, to=F32), g.i64(2, 3)),
                 g.const(freq.astype(np.float32)))   # [B, T, 1, H/2]
    sin, cos = g.op('Sin', angle), g.op('Cos', angle)
  if cfg.is_encdec:
    cross_bias = _mask_bias(g, g.op('Unsqueeze', g.op('Cast', enc_mask, to=TensorProto.BOOL),
                                    g.i64(1, 2)))
  # Cache write indices: each row's query positions, broadcast over heads and head dims.
  new_shape_k = None
  for l, (past_k, past_v, present_k, present_v, cross_k, cross_v) in enumerate(names):
    p, name = layer_params(cfg, params, 'decoder', l), f'decoder/layer_{l}'
    h = _rms_norm(g, x, p['pre_self_attention_norm']['scale'], cfg.layer_norm_epsilon,
                  f'{name}/pre_self_attention_norm')
    q, k, v = _qkv(g, h, p['self_attention'], cfg, f'{name}/self_attention')
    if sin is not None:
      q, k = _rope(g, q, sin, cos, cfg), _rope(g, k, sin, cos, cfg)
    k_BNHT = g.op('Transpose', k, perm=[0, 2, 3, 1])
    v_BNTH = g.op('Transpose', v, perm=[0, 2, 1, 3])
    if new_shape_k is None:
      new_shape_k = g.op('Shape', k_BNHT)
      idx_k = g.op('Expand', g.op('Unsqueeze', q_pos_BT, g.i64(1, 2)), new_shape_k)
      idx_v = g.op('Expand', g.op('Unsqueeze', q_pos_BT, g.i64(1, 3)), g.op('Shape', v_BNTH))
    k_cache = g.op('ScatterElements', past_k, idx_k, k_BNHT, axis=3, name=present_k)
    v_cache = g.op('ScatterElements', past_v, idx_v, v_BNTH, axis=2, name=present_v)
    g.add_output(present_k, F32, ['batch', N, H, 'cache'])
    g.add_output(present_v, F32, ['batch', N, 'cache', H])
    ctx = _attend(g, q, k_cache, v_cache, bias)
    x = g.op('Add', x, _out(g, ctx, p['self_attention'], cfg, f'{name}/self_attention'))
    if cfg.is_encdec:
      h = _rms_norm(g, x, p['pre_cross_attention_norm']['scale'], cfg.layer_norm_epsilon,
                    f'{name}/pre_cross_attention_norm')
      pc = p['cross_attention']
      q = _heads(g, _matmul(g, h, _in_out(pc['query']['kernel'], 1), f'{name}/cross_query'), cfg)
      ctx = _attend(g, q, cross_k, cross_v, cross_bias)
      x = g.op('Add', x, _out(g, ctx, pc, cfg, f'{name}/cross_attention'))
    h = _rms_norm(g, x, p['pre_mlp_norm']['scale'], cfg.layer_norm_epsilon, f'{name}/pre_mlp_norm')
    x = g.op('Add', x, _mlp(g, h, p['mlp'], cfg, f'{name}/mlp'))
  x = _rms_norm(g, x, params['decoder']['final_norm']['scale'], cfg.layer_norm_epsilon,
                'decoder/final_norm')
  if cfg.tie_embeddings:
    _matmul(g, g.op('Mul', x, g.f32(cfg.d_model ** -0.5)), np.ascontiguousarray(emb.T),
            'embedding_transposed', out='logits')
  else:
    _matmul(g, x, _np(params['decoder']['lm_head']['kernel']), 'decoder/lm_head', out='logits')
  g.outputs.insert(0, helper.make_tensor_value_info('logits', F32, ['batch', 'new',
                                                                    cfg.vocab_size]))
  return g.model()
