"""Quantised layers: stored int8 / int4 weights, fake quantisation (QAT), int8 activations.

Shape letters: C the contraction (a projection's leading `contract_dims` kernel dims, flattened),
O its output dims (flattened), K = C / G weight groups, G group size, M rows (batch x length),
V vocab, D d_model.

`layers.einsum_class(cfg)` / `layers.embed_class(cfg)` choose these layers from `cfg.quant`
(a QuantConfig):
- `QuantEinsum` (`quant.weights` 'int8' / 'int4'): stored integer weights. 'int8': symmetric, one
  scale per output channel: `qkernel` (int8, the kernel's shape and logical axes) and `qscale`
  [O...]. 'int4': symmetric, one scale per group of G (`quant.group_size`: 32, 64, 128)
  consecutive contraction elements and output channel; two values a byte along the contraction:
  `qkernel` uint8 [C/2, O...], `qscale` [C/G, O...] (the logical name of the contraction is that
  of the kernel's first, most-major contraction dim, so the flattened dim shards like it did).
- `QuantEmbed`: the embedding [V, D] as `quant/qembedding` (int8 [V, D] or uint8 [V, D/2]) with
  `quant/qscale` per row ([V]) or per row and group of D ([V, D/G]): rows are scaled for the
  lookup and the output channels of the tied output layer at once.
- `FakeQuantEinsum` / `FakeQuantEmbed` (float weights): `quant.qat` quantises and dequantises the
  kernel in the forward pass with a straight-through estimator (`w + stop_gradient(q(w) - w)`: the
  gradient is the identity's; with absmax scales no weight lies outside the clip range), and
  `quant.activations='dynamic'` quantises both operands of a projection to int8 at run time.

Activations with stored weights (`quant.activations`): 'dynamic' quantises each token's input row
to int8 at run time (absmax / 127), so the projection is int8 x int8 with int32 accumulation,
rescaled by the token scale times the weight scale; with int4 weights the int32 products are
accumulated per group and then rescaled per group. 'static' uses one calibrated input scale per
projection and layer (`act_scale`, absmax of the calibration batch / 127) instead.

Conversion from float parameters is a pytree transform in t5like/compress/quantize.py: it runs
the quantised model once with the float `kernel` / `embedding` present and the 'params'
collection mutable; each layer here then creates its quantised parameters from the float ones
(and `act_scale` from the input it sees) and returns the float result, so that later layers
calibrate on float activations. Norm scales and the relative position bias stay in float.

What comes from qwix (0.1.8) and why: `qwix.quantize` (absmax calibration, per-channel and tiled /
group-wise scales, rounding with saturation) and `qwix.dequantize` for weights and dynamic
activations, and `qwix.dot_general` for the per-channel int8 x int8 matmul (it contracts the
integer values with int32 accumulation and rescales on the output). Written here: int4 packing two
values a byte (qwix stores `jnp.int4`, one value per byte on CPU and not our uint8 layout), the
grouped integer matmul (for groups under 128 qwix falls back to dequantising to float), static
scales, and the conversion. qwix's PTQ provider (`qwix.quantize_model` / `qwix.quantize_params`)
was not used: it intercepts `jnp.einsum` inside linen modules and stores its own `WithAux(QArray)`
structure, whereas our params need our logical-axis names, our uint8 layout and plain arrays for
orbax.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from t5like import precision
from t5like.config import QUANT_GROUP_SIZES, QUANT_WEIGHTS, ConfigError, ModelConfig

SCHEMES = QUANT_WEIGHTS[1:]   # ('int8', 'int4')
GROUP_SIZES = QUANT_GROUP_SIZES


# ----------------------------------------------------------------------------- int4 packing

def pack_int4(q, axis: int = 0):
  """int8 values in [-8, 7] -> uint8, two a byte along `axis` (element 2i low nibble, 2i+1 high)."""
  q = jnp.moveaxis(jnp.asarray(q, jnp.int8), axis, 0)
  if q.shape[0] % 2:
    raise ValueError(f'pack_int4: axis {axis} has odd size {q.shape[0]}; int4 packs pairs')
  lo, hi = q[0::2].astype(jnp.uint8), q[1::2].astype(jnp.uint8)
  packed = (lo & jnp.uint8(0x0F)) | (hi << jnp.uint8(4))
  return jnp.moveaxis(packed, 0, axis)


def unpack_int4(packed, axis: int = 0):
  """The inverse of `pack_int4`: uint8 -> int8 values in [-8, 7], `axis` twice as long."""
  b = jax.lax.bitcast_convert_type(jnp.moveaxis(jnp.asarray(packed, jnp.uint8), axis, 0), jnp.int8)
  lo = jnp.right_shift(jnp.left_shift(b, jnp.int8(4)), jnp.int8(4))   # arithmetic: sign-extends
  hi = jnp.right_shift(b, jnp.int8(4))
  q = jnp.stack([lo, hi], axis=1).reshape((2 * b.shape[0],) + b.shape[1:])
  return jnp.moveaxis(q, 0, axis)


# ----------------------------------------------------------------------------- weights (arrays)

def check_group_size(scheme: str, contraction: int, group_size: int, where: str = 'kernel') -> None:
  """int4 groups must be one of GROUP_SIZES and divide the contraction (an error names both)."""
  if scheme != 'int4':
    return
  if group_size not in GROUP_SIZES:
    raise ConfigError(f'model.quant.group_size={group_size} is not valid for int4; choose '
                      f'one of {list(GROUP_SIZES)}')
  if contraction % group_size:
    fits = [g for g in GROUP_SIZES if contraction % g == 0]
    raise ConfigError(f'{where}: contraction size {contraction} is not a multiple of '
                      f'model.quant.group_size={group_size}; choose one of {fits}')


def _quantize_2d(w_CO, scheme: str, group_size: int):
  """w [C, O] float -> (q int8 [C, O], scale f32 [1, O] or [C/G, O]) via qwix."""
  w_CO = w_CO.astype(jnp.float32)
  if scheme == 'int8':
    qa = qwix.quantize(w_CO, jnp.int8, channelwise_axes=(1,))
  elif scheme == 'int4':
    qa = qwix.quantize(w_CO, jnp.int4, channelwise_axes=(1,), tiled_axes={0: group_size})
  else:
    raise ConfigError(f'weight quantisation scheme {scheme!r} is not valid; choose one of '
                      f'{list(SCHEMES)}')
  return qa.qvalue.astype(jnp.int8), qa.scale.astype(jnp.float32)


def quantize_kernel(w, contract_dims: int, scheme: str, group_size: int = 128):
  """A float kernel [C..., O...] -> (qkernel, qscale) in the stored layout (module docstring)."""
  shape = w.shape
  C, O = math.prod(shape[:contract_dims]), shape[contract_dims:]
  check_group_size(scheme, C, group_size)
  q_CO, s = _quantize_2d(w.reshape(C, -1), scheme, group_size)
  if scheme == 'int8':
    return q_CO.reshape(shape), s.reshape(O)
  return pack_int4(q_CO, 0).reshape((C // 2,) + O), s.reshape((C // group_size,) + O)


def _unpacked_2d(qkernel, qscale, C: int, scheme: str):
  """Stored (qkernel, qscale) -> (q int8 [C, O], scale f32 [1, O] or [K, O])."""
  if scheme == 'int8':
    return qkernel.reshape(C, -1), qscale.reshape(1, -1).astype(jnp.float32)
  q = unpack_int4(qkernel.reshape(C // 2, -1), 0)
  return q, qscale.reshape(qscale.shape[0], -1).astype(jnp.float32)


def dequantize_kernel(qkernel, qscale, kernel_shape: Sequence[int], contract_dims: int,
                      scheme: str):
  """The float32 kernel that (qkernel, qscale) stands for, in `kernel_shape`."""
  C = math.prod(kernel_shape[:contract_dims])
  q_CO, s = _unpacked_2d(qkernel, qscale, C, scheme)
  K = s.shape[0]
  w = (q_CO.reshape(K, C // K, -1).astype(jnp.float32) * s[:, None, :]).reshape(C, -1)
  return w.reshape(tuple(kernel_shape))


# ----------------------------------------------------------------------------- activations

def quantize_rows(x_MC, act_scale=None):
  """Rows of x -> (int8 [M, C], f32 scale [M, 1]): per row (dynamic) or one given scale (static)."""
  x_MC = x_MC.astype(jnp.float32)
  if act_scale is None:
    qa = qwix.quantize(x_MC, jnp.int8, channelwise_axes=(0,))
    return qa.qvalue, qa.scale
  s = jnp.asarray(act_scale, jnp.float32)
  q = jnp.clip(jnp.round(x_MC / s), -127, 127).astype(jnp.int8)
  return q, jnp.broadcast_to(s, (x_MC.shape[0], 1))


def int8_matmul(xq_MC, xs_M1, wq_CO, ws_1O):
  """int8 x int8 -> int32 accumulation, rescaled per row and output channel: f32 [M, O]."""
  lhs = qwix.QArray(xq_MC, xs_M1, qtype=jnp.int8)
  rhs = qwix.QArray(wq_CO, ws_1O, qtype=jnp.int8)
  return qwix.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def grouped_int_matmul(xq_MC, xs_M1, wq_CO, ws_KO):
  """int8 x int4-valued int8 per group of C with int32 accumulation, rescaled per group: f32 [M, O]."""
  M, C = xq_MC.shape
  K = ws_KO.shape[0]
  acc_KMO = jnp.einsum('MKG,KGO->KMO', xq_MC.reshape(M, K, C // K), wq_CO.reshape(K, C // K, -1),
                       preferred_element_type=jnp.int32)
  return jnp.einsum('KMO,KO->MO', acc_KMO.astype(jnp.float32), ws_KO) * xs_M1


def _parse_spec(spec: str, contract_dims: int, where: str):
  """Checks that `spec` is 'x...C, C O -> x... O' (the contraction trails x and leads the kernel)."""
  try:
    ins, out = spec.replace(' ', '').split('->')
    lhs, rhs = ins.split(',')
  except ValueError:
    raise ValueError(f'{where}: einsum spec {spec!r} is not of the form "x,k->y"') from None
  c = contract_dims
  if (lhs[len(lhs) - c:] != rhs[:c]) or out != lhs[:len(lhs) - c] + rhs[c:]:
    raise ValueError(f'{where}: quantised projections need the contraction to trail the input and '
                     f'lead the kernel (e.g. "BTD,DF->BTF"); got {spec!r} with contract_dims={c}')


def _quantized_matmul_2d(x_MC, q_CO, s, scheme: str, activation_quant: str, act_scale, dtype):
  """x [M, C] against a stored quantised weight [C, O] -> f32 [M, O]."""
  if activation_quant == 'none':
    if scheme == 'int8':
      return jnp.dot(x_MC, q_CO.astype(dtype), preferred_element_type=jnp.float32) * s
    K, C = s.shape[0], q_CO.shape[0]
    w = (q_CO.reshape(K, C // K, -1).astype(jnp.float32) * s[:, None, :]).reshape(C, -1)
    return jnp.dot(x_MC, w.astype(dtype), preferred_element_type=jnp.float32)
  xq, xs = quantize_rows(x_MC, act_scale if activation_quant == 'static' else None)
  if scheme == 'int8':
    return int8_matmul(xq, xs, q_CO, s)
  return grouped_int_matmul(xq, xs, q_CO, s)


def _boxed(value, shape, dtype, axes):
  """A logically partitioned init that returns `value` (or zeros of the shape flax checks against)."""
  init = lambda *_: jnp.zeros(shape, dtype) if value is None else value
  return nn.with_logical_partitioning(init, tuple(axes))


def _declare_act_scale(module, x_MC, conversion: bool):
  """The static input scale of a projection: created from the input it first sees."""
  value = None
  if conversion or not module.has_variable('params', 'act_scale'):
    value = jnp.maximum(jnp.max(jnp.abs(x_MC.astype(jnp.float32))), 1e-8) / 127.0
  return module.param('act_scale', _boxed(value, (), jnp.float32, ()))


# ----------------------------------------------------------------------------- layers

def _policy(cfg: ModelConfig) -> precision.Policy:
  return precision.get_policy(cfg.precision)


class QuantEinsum(nn.Module):
  """A projection with stored quantised weights (`cfg.quant.weights`); the fields of layers.Einsum.

  With a float `kernel` in the module's params (conversion, see compress/quantize.py) it creates
  `qkernel` / `qscale` from it and returns the float result; at init it quantises a fresh normal
  kernel of `init_std`.
  """
  cfg: ModelConfig
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  init_std: float
  contract_dims: int = 1
  out_f32: bool = False

  @nn.compact
  def __call__(self, x):
    cfg, policy = self.cfg, _policy(self.cfg)
    scheme, G, c = cfg.quant.weights, cfg.quant.group_size, self.contract_dims
    where = '/'.join(self.path) or type(self).__name__
    _parse_spec(self.spec, c, where)
    shape = tuple(self.kernel_shape)
    C, O = math.prod(shape[:c]), shape[c:]
    check_group_size(scheme, C, G, where)
    conversion = self.has_variable('params', 'kernel')
    w = None
    if conversion:
      w = self.param('kernel', nn.initializers.zeros, shape, policy.param_dtype)
    elif not self.has_variable('params', 'qkernel'):
      w = nn.initializers.normal(self.init_std)(self.make_rng('params'), shape, jnp.float32)
    quantized = quantize_kernel(w, c, scheme, G) if w is not None else (None, None)
    axes = tuple(self.kernel_axes)
    q_axes = axes if scheme == 'int8' else (axes[0],) + axes[c:]
    s_axes = axes[c:] if scheme == 'int8' else (axes[0],) + axes[c:]
    q_shape = shape if scheme == 'int8' else (C // 2,) + O
    s_shape = O if scheme == 'int8' else (C // G,) + O
    q_dtype = jnp.int8 if scheme == 'int8' else jnp.uint8
    qkernel = self.param('qkernel', _boxed(quantized[0], q_shape, q_dtype, q_axes))
    qscale = self.param('qscale', _boxed(quantized[1], s_shape, jnp.float32, s_axes))

    x = policy.cast_to_compute(x)
    out_dtype = jnp.float32 if self.out_f32 else policy.compute_dtype
    lead = x.shape[:x.ndim - c]
    x_MC = x.reshape(-1, C)
    act_scale = None
    if cfg.quant.activations == 'static':
      act_scale = _declare_act_scale(self, x_MC, conversion)
    if conversion:
      return jnp.einsum(self.spec, x, w.astype(policy.compute_dtype),
                        preferred_element_type=jnp.float32).astype(out_dtype)
    q_CO, s = _unpacked_2d(qkernel, qscale, C, scheme)
    y_MO = _quantized_matmul_2d(x_MC, q_CO, s, scheme, cfg.quant.activations, act_scale,
                                policy.compute_dtype)
    return y_MO.reshape(lead + O).astype(out_dtype)


class FakeQuantEinsum(nn.Module):
  """A float-weight projection with fake-quantised weights (`cfg.quant.qat`) and / or int8
  activations quantised at run time (`cfg.quant.activations='dynamic'`); the fields of layers.Einsum."""
  cfg: ModelConfig
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  init_std: float
  contract_dims: int = 1
  out_f32: bool = False

  @nn.compact
  def __call__(self, x):
    cfg, policy = self.cfg, _policy(self.cfg)
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.init_std), self.kernel_axes), self.kernel_shape,
        policy.param_dtype)
    kernel = fake_quant_kernel(kernel, cfg, self.contract_dims)
    x = policy.cast_to_compute(x)
    kernel = kernel.astype(policy.compute_dtype)
    if cfg.quant.activations != 'none':
      return dynamic_einsum(self.spec, x, kernel, cfg, self.contract_dims, out_f32=self.out_f32)
    return jnp.einsum(self.spec, x, kernel,
                      preferred_element_type=jnp.float32 if self.out_f32 else None)


class QuantEmbed(nn.Module):
  """The token embedding with a stored quantised table (`cfg.quant.weights`): lookup and tied
  output layer, parameters under `quant/`."""
  cfg: ModelConfig

  def setup(self):
    self.quant = QuantTable(self.cfg)

  def __call__(self, ids_BT):
    return self.quant.lookup(ids_BT, _policy(self.cfg).compute_dtype)

  def attend(self, x_BTD):
    return self.quant.attend(x_BTD, _policy(self.cfg))


class FakeQuantEmbed(nn.Module):
  """A float token embedding whose tied output layer is fake-quantised (`cfg.quant.qat`)."""
  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                                  ('vocab', 'embed')),
        (self.cfg.vocab_size, self.cfg.d_model), _policy(self.cfg).param_dtype)

  def __call__(self, ids_BT):
    return jnp.take(self.embedding, ids_BT, axis=0).astype(_policy(self.cfg).compute_dtype)

  def attend(self, x_BTD):
    policy = _policy(self.cfg)
    table = fake_quant_kernel(self.embedding, self.cfg, contract_dims=1, channel_axis=0)
    return jnp.einsum('BTD,VD->BTV', policy.cast_to_compute(x_BTD),
                      table.astype(policy.compute_dtype), preferred_element_type=jnp.float32)


class QuantTable(nn.Module):
  """The quantised token table [V, D] of `QuantEmbed` (lookup and tied output layer)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    scheme, G = cfg.quant.weights, cfg.quant.group_size
    V, D = cfg.vocab_size, cfg.d_model
    check_group_size(scheme, D, G, '/'.join(self.path) or 'embedding')
    conversion = self.has_variable('params', 'embedding')
    table = None
    if conversion:
      table = self.param('embedding', nn.initializers.zeros, (V, D), jnp.float32)
    elif not self.has_variable('params', 'qembedding'):
      table = nn.initializers.normal(1.0)(self.make_rng('params'), (V, D), jnp.float32)
    q = s = None
    if table is not None:   # quantise as a kernel [D, V]: contraction D, output channels V
      q, s = quantize_kernel(table.T, 1, scheme, G)
      q, s = q.T, s.T       # [V, D] or [V, D/2]; [V] or [V, D/G]
    self.conversion = conversion
    self.float_table = table
    s_axes = ('vocab',) if scheme == 'int8' else ('vocab', 'embed')
    q_shape, q_dtype = ((V, D), jnp.int8) if scheme == 'int8' else ((V, D // 2), jnp.uint8)
    s_shape = (V,) if scheme == 'int8' else (V, D // G)
    self.qembedding = self.param('qembedding', _boxed(q, q_shape, q_dtype, ('vocab', 'embed')))
    self.qscale = self.param('qscale', _boxed(s, s_shape, jnp.float32, s_axes))

  def _rows(self, q_VX, s_VX):
    """Dequantised rows of (a gather of) the table: f32 [..., D]."""
    return table_rows(self.cfg.quant.weights, q_VX, s_VX)

  def dequantized(self):
    """The float32 table [V, D]."""
    if self.conversion:
      return self.float_table
    return self._rows(self.qembedding, self.qscale)

  def lookup(self, ids_BT, compute_dtype):
    if self.conversion:
      return jnp.take(self.float_table, ids_BT, axis=0).astype(compute_dtype)
    rows = self._rows(jnp.take(self.qembedding, ids_BT, axis=0), jnp.take(self.qscale, ids_BT, axis=0))
    return rows.astype(compute_dtype)

  def attend(self, x_BTD, policy):
    """Logits x @ E^T in float32 (int8 x int8 when activations are quantised)."""
    cfg = self.cfg
    x = policy.cast_to_compute(x_BTD)
    B, T, D = x.shape
    x_MD = x.reshape(B * T, D)
    act_scale = None
    if cfg.quant.activations == 'static':
      if self.conversion or not self.has_variable('params', 'act_scale'):
        value = jnp.maximum(jnp.max(jnp.abs(x_MD.astype(jnp.float32))), 1e-8) / 127.0
        self.put_variable('params', 'act_scale', nn.Partitioned(value, names=()))
      act_scale = nn.unbox(self.get_variable('params', 'act_scale'))
    if self.conversion:
      return jnp.einsum('BTD,VD->BTV', x, self.float_table.astype(policy.compute_dtype),
                        preferred_element_type=jnp.float32)
    scheme = cfg.quant.weights
    if cfg.quant.activations == 'none':
      if scheme == 'int8':
        y = jnp.einsum('MD,VD->MV', x_MD, self.qembedding.astype(policy.compute_dtype),
                       preferred_element_type=jnp.float32) * self.qscale.astype(jnp.float32)
      else:
        y = jnp.einsum('MD,VD->MV', x_MD, self.dequantized().astype(policy.compute_dtype),
                       preferred_element_type=jnp.float32)
      return y.reshape(B, T, -1)
    xq, xs = quantize_rows(x_MD, act_scale)
    if scheme == 'int8':
      lhs = qwix.QArray(xq, xs, qtype=jnp.int8)
      rhs = qwix.QArray(self.qembedding, self.qscale.astype(jnp.float32)[:, None], qtype=jnp.int8)
      y = qwix.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
      q_VD = unpack_int4(self.qembedding, axis=-1)
      s_VK = self.qscale.astype(jnp.float32)
      K = s_VK.shape[-1]
      acc_KMV = jnp.einsum('MKG,VKG->KMV', xq.reshape(B * T, K, D // K), q_VD.reshape(-1, K, D // K),
                           preferred_element_type=jnp.int32)
      y = jnp.einsum('KMV,VK->MV', acc_KMV.astype(jnp.float32), s_VK) * xs
    return y.reshape(B, T, -1)


def table_rows(scheme: str, q_VX, s_VX):
  """Rows of a stored quantised table (`QuantTable`: int8 [..., D] with scales [...], or uint8
  [..., D/2] with scales [..., D/G]) dequantised: f32 [..., D]."""
  if scheme == 'int8':
    return q_VX.astype(jnp.float32) * s_VX[..., None].astype(jnp.float32)
  q = unpack_int4(q_VX, axis=-1).astype(jnp.float32)
  K = s_VX.shape[-1]
  q = q.reshape(q.shape[:-1] + (K, -1)) * s_VX[..., None].astype(jnp.float32)
  return q.reshape(q.shape[:-2] + (-1,))


def fake_quant_kernel(kernel, cfg: ModelConfig, contract_dims: int = 1,
                      channel_axis: int | None = None):
  """Quantise-dequantise `kernel` per `cfg.quant.qat`, straight-through estimator (identity grad).

  Channels are the dims after the first `contract_dims`; with `channel_axis` (the embedding's 0)
  that axis is the output channel and all others are contracted.
  """
  scheme = cfg.quant.qat
  if scheme == 'none':
    return kernel
  w = kernel if channel_axis is None else jnp.moveaxis(kernel, channel_axis, -1)
  c = contract_dims if channel_axis is None else w.ndim - 1
  q, s = quantize_kernel(jax.lax.stop_gradient(w), c, scheme, cfg.quant.group_size)
  dq = dequantize_kernel(q, s, w.shape, c, scheme)
  if channel_axis is not None:
    dq = jnp.moveaxis(dq, -1, channel_axis)
  return kernel + jax.lax.stop_gradient(dq.astype(kernel.dtype) - kernel)


def dynamic_einsum(spec: str, x, kernel, cfg: ModelConfig, contract_dims: int = 1,
                   out_f32: bool = False):
  """A float-weight projection with both operands quantised to int8 at run time (int32 accumulate).

  Activations per token, weights per output channel; returns x's dtype (float32 with `out_f32`).
  """
  if cfg.quant.activations == 'static':
    raise ConfigError("model.quant.activations='static' needs calibrated scales stored with "
                      "quantised weights: use quantize.quantize_params(params, cfg, scheme, "
                      "activation_quant='static', calibration_inputs=...)")
  c = contract_dims
  _parse_spec(spec, c, 'dynamic_einsum')
  C, O = math.prod(kernel.shape[:c]), kernel.shape[c:]
  lead = x.shape[:x.ndim - c]
  wq, ws = _quantize_2d(kernel.reshape(C, -1), 'int8', 0)
  xq, xs = quantize_rows(x.reshape(-1, C))
  y = int8_matmul(xq, xs, wq, ws).reshape(lead + O)
  return y.astype(jnp.float32 if out_f32 else x.dtype)
