"""Decode backends: how a decoding step runs on this machine, attached at one seam.

  be = get_backend('auto', cfg)                  # 'auto' | 'xla' | 'cpu_kernels'
  params = be.prepare(cfg, params)               # once, eagerly (a server at load)
  cache, logits_BV = be.prefill(params, cfg, inputs_BS, cache_len)     # inside jit
  logits_BV, cache = be.step(params, cfg, tokens_B, cache)
  tok_B, logp_B = be.pick(logits_BV)             # greedy

The model (t5like/models) has one parameter layout (layers stacked for nn.scan) and one cache
layout ([L, ...] per key). Decoding uses another of each, produced and consumed here:
- per-layer weights (`decoder/stack/group_g`, and the encoder's in `prepare`): inside a
  `lax.while_loop` body, slicing layer l out of stacked weights is a copy of it on every step (XLA
  does not hoist it), so a loop would read about twice the weight bytes it needs;
- per-layer K/V caches (a list per key), which the loop then updates in place.
While a step is traced under `attached()`, a flax method interceptor (as compress/dynamic.py's)
runs `LayerStack.__call__ / step / cross_kv` layer by layer on those, applying the model's own
layer modules; stacked params and caches go through the model's scan untouched.

`XlaBackend` is that alone. `CpuKernelBackend` adds the hand-written CPU kernels of
t5like/kernels: `prepare` packs the weights a step multiplies by into panels
(`cpu_matmul.PackedKernel`; stored int8 / int4 weights of a quantised model as
`cpu_matmul.PackedQuantKernel`, dequantised in registers), and the interceptor replaces `Einsum`s
and `QuantEinsum`s (and a quantised tied embedding's lookup and output layer) with packed kernels
(unpacked for XLA where the kernel does not apply, e.g. too many rows), the fused q/k/v and
wi_0/wi_1 calls, one-query attention over the cache (with the cache write fused in for
self-attention), the encoder's attention, and the greedy pick. `get_backend('auto', cfg)` picks
it only on a CPU backend for a float32 model with float or weight-only int8 / int4 weights
(`kernel_obstacle`); on GPU / TPU nothing is built or probed. Without
a C++ compiler the library logs one warning and 'auto' / 'cpu_kernels' run the XLA backend.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5like import precision
from t5like.config import ModelConfig
from t5like.infer import sampling
from t5like.kernels import cpu_matmul, decode_attention, library, token_pick
from t5like.models import build_model, init_cache
from t5like.models.attention import Attention
from t5like.models.layers import MLP, Einsum, Embed, policy_of, project, tied_logits
from t5like.models.quant import QuantEinsum, QuantEmbed, dequantize_kernel, table_rows
from t5like.models.transformer import LayerStack

BACKENDS = ('auto', 'xla', 'cpu_kernels')
_CACHE_KEYS = ('self_k', 'self_v', 'cross_k', 'cross_v')


# ----------------------------------------------------------------------------- decoding layout

def split_layers(cfg: ModelConfig, params, encoder: bool = False):
  """The decoder's stacked [G, ...] layer weights as one subtree per group (`decoder/stack/
  group_g`), and with `encoder` the encoder's as well. Idempotent; the rest is shared."""
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
    params[name] = dict(params[name], stack={k: v for k, v in stack.items() if k != 'layers'}
                        | groups)
  return params


def decoding_cache(cache):
  """`init_cache`'s [L, ...] K/V as per-layer lists (what a per-layer decoding step updates)."""
  return dict(cache, **{k: list(cache[k]) for k in _CACHE_KEYS if k in cache})


def prompt_lengths(prompts_BP):
  """Length of each right-padded prompt (position of the last non-zero token + 1, at least 1)."""
  P = prompts_BP.shape[1]
  nonzero = prompts_BP != 0
  last = P - jnp.argmax(nonzero[:, ::-1], axis=1)
  return jnp.where(nonzero.any(axis=1), last, 1).astype(jnp.int32)


def _is_packed(x) -> bool:
  return isinstance(x, (cpu_matmul.PackedKernel, cpu_matmul.PackedQuantKernel))


def _per_layer_params(stack: LayerStack):
  params = stack.variables.get('params', {})
  return params if 'group_0' in params else None


def _layers(stack: LayerStack, params):
  """(unbound layer module, its variables) for each of the stack's layers, in order."""
  G = stack.cfg.shared_layer_groups or stack.num_layers
  R = stack.num_layers // G
  layer = stack.layer_cls(stack.cfg, parent=None)
  return [(layer, {'params': params[f'group_{l // R}']['layer']}) for l in range(stack.num_layers)]


def _stack_call(stack, next_fun, x, *broadcast_args, deterministic=True):
  params = _per_layer_params(stack)
  if params is None:
    return next_fun(x, *broadcast_args, deterministic=deterministic)
  if not deterministic:
    raise ValueError('per-layer (decoding layout) parameters run deterministic forwards only')
  for layer, variables in _layers(stack, params):
    x = layer.apply(variables, x, True, *broadcast_args)
  return x


def _stack_step(stack, next_fun, x, cache, *broadcast_args):
  params = _per_layer_params(stack)
  per_layer_cache = isinstance(cache.get('self_v'), (list, tuple))
  if params is None:
    if per_layer_cache:
      raise ValueError('a per-layer decoding cache needs per-layer weights: pass the parameters '
                       'through the backend (backend.prepare or backend.layout) first')
    return next_fun(x, cache, *broadcast_args)
  new = {}
  for l, (layer, variables) in enumerate(_layers(stack, params)):
    x, out = layer.apply(variables, x, {k: v[l] for k, v in cache.items()}, *broadcast_args,
                         method='step')
    for k, v in out.items():
      new.setdefault(k, []).append(v)
  return x, new


def _stack_cross_kv(stack, next_fun, encoded_BSD):
  params = _per_layer_params(stack)
  if params is None:
    return next_fun(encoded_BSD)
  kv = {}
  for layer, variables in _layers(stack, params):
    for k, v in layer.apply(variables, encoded_BSD, method='cross_kv').items():
      kv.setdefault(k, []).append(v)
  return kv


# ----------------------------------------------------------------------------- CPU kernel hooks

def _packed(module: nn.Module, name: str):
  """The module's packed parameter `name`, or None (absent or a plain array)."""
  if not module.has_variable('params', name):
    return None
  w = module.get_variable('params', name)
  return w if _is_packed(w) else None


def _fused(module: nn.Module, names, x):
  """[x @ child `name`'s kernel for each name] as one kernel call when all are packed (one
  contracted dim; float, or quantised with one scheme) and the kernel applies here; else None."""
  params = module.variables.get('params', {})
  kernels = [params.get(name, {}).get('kernel') for name in names]
  matmul, wanted = cpu_matmul.matmul_fused, cpu_matmul.wanted
  if all(isinstance(params.get(name, {}).get('qkernel'), cpu_matmul.PackedQuantKernel)
         for name in names):
    kernels = [params[name]['qkernel'] for name in names]
    if len({k.scheme for k in kernels}) != 1:
      return None
    matmul, wanted = cpu_matmul.matmul_quant_fused, cpu_matmul.quant_wanted
  if not all(_is_packed(k) and not k.transposed for k in kernels):
    return None
  x_flat = x.reshape(-1, x.shape[-1])
  if not all(k.k == x.shape[-1] for k in kernels) or not wanted(x_flat, kernels[0]):
    return None
  outs = matmul(x_flat, kernels)   # stored int4 [C/2, O...]: output dims still trail
  return tuple(y.reshape(x.shape[:-1] + k.shape[1:]) for y, k in zip(outs, kernels))


def _einsum(mod: Einsum, next_fun, x):
  w = _packed(mod, 'kernel')
  if w is None:
    return next_fun(x)
  c = mod.contract_dims
  lead = x.shape[:-c]
  x_flat = x.reshape(lead + (-1,))
  if cpu_matmul.wanted(x_flat, w):
    return cpu_matmul.matmul(x_flat, w).reshape(lead + tuple(mod.kernel_shape[c:]))
  return project(mod, x, w.unpacked())


def _embed_lookup(mod: Embed, next_fun, ids_BT):
  w = _packed(mod, 'embedding')
  if w is None:
    return next_fun(ids_BT)
  return w.rows(ids_BT).astype(policy_of(mod.cfg).compute_dtype)


def _embed_attend(mod: Embed, next_fun, x_BTD):
  w = _packed(mod, 'embedding')
  if w is None:
    return next_fun(x_BTD)
  if cpu_matmul.wanted(x_BTD, w):
    return cpu_matmul.matmul(x_BTD, w)
  return tied_logits(mod.cfg, x_BTD, w.unpacked())


def _quant_einsum(mod: QuantEinsum, next_fun, x):
  params = mod.variables.get('params', {})
  w = params.get('qkernel')
  if not isinstance(w, cpu_matmul.PackedQuantKernel):
    return next_fun(x)
  c = mod.contract_dims
  lead = x.shape[:-c]
  x_flat = x.reshape(lead + (-1,))
  if cpu_matmul.quant_wanted(x_flat, w):
    return cpu_matmul.matmul_quant(x_flat, w).reshape(lead + tuple(mod.kernel_shape[c:]))
  # Too many rows for the kernel (a long prompt): the dequantised kernel through XLA.
  kernel = dequantize_kernel(w.unpacked(), params['qscale'], mod.kernel_shape, c, w.scheme)
  return project(mod, x, kernel)


def _quant_table(mod: QuantEmbed):
  """(packed table, stored scales) of a QuantEmbed, or None when the table is not packed."""
  table = mod.variables.get('params', {}).get('quant', {})
  w = table.get('qembedding')
  return (w, table['qscale']) if isinstance(w, cpu_matmul.PackedQuantKernel) else None


def _quant_embed_lookup(mod: QuantEmbed, next_fun, ids_BT):
  packed = _quant_table(mod)
  if packed is None:
    return next_fun(ids_BT)
  w, scale = packed
  rows = table_rows(w.scheme, w.stored_rows(ids_BT), jnp.take(scale, ids_BT, axis=0))
  return rows.astype(policy_of(mod.cfg).compute_dtype)


def _quant_embed_attend(mod: QuantEmbed, next_fun, x_BTD):
  packed = _quant_table(mod)
  if packed is None:
    return next_fun(x_BTD)
  w, scale = packed
  if cpu_matmul.quant_wanted(x_BTD, w):
    return cpu_matmul.matmul_quant(x_BTD, w)
  return tied_logits(mod.cfg, x_BTD, table_rows(w.scheme, w.unpacked(), scale))


def _gate_and_up(mod: MLP, next_fun, x_BTD):
  return _fused(mod, ('wi_0', 'wi_1'), x_BTD) or next_fun(x_BTD)


def _qkv(mod: Attention, next_fun, x_BTD):
  return _fused(mod, ('query', 'key', 'value'), x_BTD) or next_fun(x_BTD)


def _attend(mod: Attention, next_fun, q_BTNH, k_BSNH, v_BSNH, bias_BNTS, deterministic):
  if ((deterministic or not mod.cfg.dropout_rate)
      and decode_attention.wanted_prefill(q_BTNH, k_BSNH, v_BSNH)):
    # A prefill (an encoder): K/V streamed once per four queries.
    return decode_attention.attend_prefill(q_BTNH, k_BSNH, v_BSNH, bias_BNTS)
  return next_fun(q_BTNH, k_BSNH, v_BSNH, bias_BNTS, deterministic)


def _attend_cached(mod: Attention, next_fun, q_BTNH, k_BTNH, v_BTNH, keys, values, index_B,
                   bias_BNTS):
  if decode_attention.wanted(q_BTNH, keys, values) and k_BTNH.dtype == jnp.float32:
    # One new position per row: cache write and attention in one pass.
    ctx_BNH, keys, values = decode_attention.attend_cached(
        q_BTNH[:, 0], k_BTNH[:, 0], v_BTNH[:, 0], keys, values, bias_BNTS[:, :, 0], index_B)
    return ctx_BNH[:, None], keys, values
  return next_fun(q_BTNH, k_BTNH, v_BTNH, keys, values, index_B, bias_BNTS)


def _attend_cache(mod: Attention, next_fun, q_BTNH, keys, values, bias_BNTS):
  if decode_attention.wanted(q_BTNH, keys, values):
    return decode_attention.attend(q_BTNH[:, 0], keys, values, bias_BNTS[:, :, 0])[:, None]
  return next_fun(q_BTNH, keys, values, bias_BNTS)


# Projections a decoding step applies to its one new token, by parent module name, with the number
# of leading kernel dims each contracts. Cross-attention keys and values are applied once, to the
# encoder output, and stay unpacked.
_STEP_PROJECTIONS = {'query': 1, 'key': 1, 'value': 1, 'out': 2, 'wi': 1, 'wi_0': 1, 'wi_1': 1,
                     'wo': 1, 'lm_head': 1}


def pack_step_weights(cfg: ModelConfig, params):
  """`params` with the decoder's per-step projection kernels and its output layer (a tied
  embedding, or lm_head) packed (`cpu_matmul.PackedKernel`) where `cpu_matmul.packable`; stored
  int8 / int4 weights (`qkernel`, `qembedding`) as `cpu_matmul.PackedQuantKernel` with their
  scales (the stored `qscale` stays beside them, for the odd call that cannot use the kernel)."""
  scheme = cfg.quant.weights

  def visit(tree, path):
    out = {}
    for name, sub in tree.items():
      here = path + (name,)
      if isinstance(sub, dict):
        out[name] = visit(sub, here)
      elif (name == 'qkernel' and path[-1] in _STEP_PROJECTIONS and 'qscale' in tree
            and cpu_matmul.quant_packable(sub)):
        once = len(path) > 1 and path[-2] == 'cross_attention' and path[-1] in ('key', 'value')
        dims = _STEP_PROJECTIONS[path[-1]] if scheme == 'int8' else 1   # int4: [C/2, O...]
        columns = int(np.prod(sub.shape[dims:]))
        out[name] = (sub if once or columns % cpu_matmul.PANEL else
                     cpu_matmul.pack_quant(sub, tree['qscale'], scheme, dims))
      elif (name == 'qembedding' and path == ('shared_embedding', 'quant') and cfg.tie_embeddings
            and cpu_matmul.quant_packable(sub) and sub.shape[0] % cpu_matmul.PANEL == 0):
        out[name] = cpu_matmul.pack_quant(sub, tree['qscale'], scheme, transposed=True)
      elif (name == 'kernel' and path[-1] in _STEP_PROJECTIONS and scheme == 'none'
            and cpu_matmul.packable(sub)):
        once = len(path) > 1 and path[-2] == 'cross_attention' and path[-1] in ('key', 'value')
        dims = _STEP_PROJECTIONS[path[-1]]
        columns = int(np.prod(sub.shape[dims:]))
        out[name] = sub if once or columns % cpu_matmul.PANEL else cpu_matmul.pack(sub, dims)
      elif (name == 'embedding' and path == ('shared_embedding',) and cfg.tie_embeddings
            and scheme == 'none' and cpu_matmul.packable(sub)
            and sub.shape[0] % cpu_matmul.PANEL == 0):
        out[name] = cpu_matmul.pack(sub, transposed=True)
      else:
        out[name] = sub
    return out
  params = dict(params)
  if 'decoder' in params:
    params['decoder'] = visit(params['decoder'], ('decoder',))
  if 'shared_embedding' in params:
    params['shared_embedding'] = visit(params['shared_embedding'], ('shared_embedding',))
  return params


def kernel_obstacle(cfg: ModelConfig) -> str | None:
  """Why the CPU kernels cannot run this model (None if they can): they compute in float32, with
  float32 or stored int8 / int4 weights and float activations."""
  q = []
  if precision.get_policy(cfg.precision).compute_dtype != jnp.float32:
    q.append(f'model.precision={cfg.precision!r} (the kernels compute in float32)')
  if cfg.quant.activations != 'none' or cfg.quant.qat != 'none':
    q.append(f'model.quant={cfg.quant} (the kernels take float activations and stored, not '
             'fake-quantised, weights)')
  elif cfg.quant.weights not in ('none',) + cpu_matmul.QUANT_SCHEMES:
    q.append(f'model.quant.weights={cfg.quant.weights!r} (the kernels take float32, int8 or int4 '
             'weights)')
  return '; '.join(q) or None


# ----------------------------------------------------------------------------- backends

class XlaBackend:
  """Decoding with XLA's own ops on the per-layer decoding layout (any platform)."""
  name = 'xla'
  _hooks = {(LayerStack, '__call__'): _stack_call, (LayerStack, 'step'): _stack_step,
            (LayerStack, 'cross_kv'): _stack_cross_kv}

  def prepare(self, cfg: ModelConfig, params):
    """The decoding layout of `params`, for repeated decoding (eager; idempotent). Decoding
    functions accept any layout, but split stacked weights (a copy) on every call."""
    return jax.block_until_ready(self.layout(cfg, params, encoder=True))

  def layout(self, cfg: ModelConfig, params, encoder: bool = False):
    """Per-layer weights (traceable); packed weights from another backend are unpacked."""
    params = jax.tree.map(lambda w: w.unpacked() if _is_packed(w) else w, params,
                          is_leaf=_is_packed)
    return split_layers(cfg, params, encoder)

  def _intercept(self, next_fun, args, kwargs, context):
    hook = self._hooks.get((type(context.module), context.method_name))
    if hook is None or context.module.is_initializing():
      return next_fun(*args, **kwargs)
    return hook(context.module, next_fun, *args, **kwargs)

  @contextlib.contextmanager
  def attached(self):
    """While tracing within this context, model calls run on this backend."""
    with nn.intercept_methods(self._intercept):
      yield

  def decoding_cache(self, cache):
    return decoding_cache(cache)

  def prefill(self, params, cfg: ModelConfig, inputs_BS, cache_len: int):
    """(cache holding the prompt or encoder output, logits [B, V] of the first new token).

    inputs: encoder tokens [B, S] (0 = padding), or right-padded prompts [B, P] for a
    decoder-only model, whose rows then continue right after their own prompt (stale entries
    beyond it are masked until rewritten). cache_len: decoder positions the cache holds
    (prompt included)."""
    model = build_model(cfg)
    B, S = inputs_BS.shape
    with self.attached():
      if cfg.is_encdec:
        cache = self.decoding_cache(init_cache(cfg, B, cache_len, S))
        cache = model.apply({'params': params}, inputs_BS, cache, method='prefill')
        start_B = jnp.full((B,), cfg.decoder_start_id, jnp.int32)
        logits_BV, cache = self.step(params, cfg, start_B, cache)
        return cache, logits_BV
      lengths_B = prompt_lengths(inputs_BS)
      cache = self.decoding_cache(init_cache(cfg, B, cache_len))
      logits_BSV, cache = model.apply({'params': params}, inputs_BS, cache, method='decode_step')
    last_BV = jnp.take_along_axis(logits_BSV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return dict(cache, index=lengths_B), last_BV

  def step(self, params, cfg: ModelConfig, tokens_B, cache):
    """One token per row appended at its cache index: (logits [B, V], new cache)."""
    with self.attached():
      logits_B1V, cache = build_model(cfg).apply({'params': params}, tokens_B[:, None], cache,
                                                 method='decode_step')
    return logits_B1V[:, 0], cache

  def pick(self, logits_BV):
    """Greedy: (argmax token [B], its log-probability [B])."""
    return sampling.greedy_pick(logits_BV)

  def __repr__(self):
    return f'{type(self).__name__}()'


class CpuKernelBackend(XlaBackend):
  """XlaBackend plus the CPU kernels of t5like/kernels where they apply (module docstring)."""
  name = 'cpu_kernels'
  _hooks = {**XlaBackend._hooks,
            (Einsum, '__call__'): _einsum, (Embed, '__call__'): _embed_lookup,
            (Embed, 'attend'): _embed_attend, (MLP, 'gate_and_up'): _gate_and_up,
            (Attention, 'qkv'): _qkv, (Attention, 'attend'): _attend,
            (Attention, 'attend_cached'): _attend_cached,
            (Attention, 'attend_cache'): _attend_cache,
            (QuantEinsum, '__call__'): _quant_einsum,
            (QuantEmbed, '__call__'): _quant_embed_lookup,
            (QuantEmbed, 'attend'): _quant_embed_attend}

  def prepare(self, cfg: ModelConfig, params):
    """Per-layer weights; those a decoding step multiplies by packed for the few-row kernel
    (the decoder's other weights and the encoder stay as they are)."""
    params = split_layers(cfg, params, encoder=True)   # eager: stacks copied, the rest shared
    if kernel_obstacle(cfg) is None and library.available():
      params = pack_step_weights(cfg, params)
    return jax.block_until_ready(params)

  def layout(self, cfg: ModelConfig, params, encoder: bool = False):
    return split_layers(cfg, params, encoder)

  def pick(self, logits_BV):
    if token_pick.wanted(logits_BV):   # one fused pass over the logits
      return token_pick.greedy(logits_BV)
    return sampling.greedy_pick(logits_BV)


XLA = XlaBackend()
CPU_KERNELS = CpuKernelBackend()


def get_backend(backend: str | XlaBackend, cfg: ModelConfig) -> XlaBackend:
  """The backend for `backend` ('auto', 'xla', 'cpu_kernels' or a backend object) and model.

  'auto' is 'cpu_kernels' where jax's default backend is the CPU and the model computes in
  float32 with float or weight-only int8 / int4 weights, else 'xla'; nothing is built or probed
  off the CPU. Where the kernels cannot be built (no C++ compiler), the library logs one warning
  and this returns XLA.
  """
  if isinstance(backend, XlaBackend):
    return backend
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not valid; choose one of {list(BACKENDS)}')
  if backend == 'xla':
    return XLA
  platform = jax.default_backend()
  obstacle = kernel_obstacle(cfg)
  if backend == 'auto':
    if platform != 'cpu' or obstacle:
      return XLA
  elif platform != 'cpu':
    raise ValueError(f"backend='cpu_kernels' runs on the CPU, but jax's default backend is "
                     f"{platform!r}; use backend='auto' or 'xla'")
  elif obstacle:
    raise ValueError(f"backend='cpu_kernels' cannot run model {cfg.name!r}: {obstacle}; use "
                     "backend='auto' or 'xla'")
  return CPU_KERNELS if library.available() else XLA
