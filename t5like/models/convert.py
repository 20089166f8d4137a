"""Conversion between transformers' `T5ForConditionalGeneration` checkpoints and t5like params.

A checkpoint folder is `config.json` plus `model.safetensors` (or, on import only, a sharded
`model.safetensors.index.json` with its shards), with HF's parameter names:

  HF name (per block i, stack = encoder | decoder)      HF shape     t5like leaf (shape)
  shared.weight                                        [V, D]       shared_embedding/embedding
  {stack}.block.{i}.layer.0.SelfAttention.{q,k,v}      [N*H, D]     .../query|key|value [L, D, N, H]
  {stack}.block.{i}.layer.0.SelfAttention.o            [D, N*H]     .../out/kernel [L, N, H, D]
  {stack}.block.0.layer.0.SelfAttention
      .relative_attention_bias                         [K, N]       {stack}/relpos_bias [N, K]
  decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}  as above     .../cross_attention
  ...DenseReluDense.{wi | wi_0, wi_1}, .wo             [F, D], [D, F]  .../mlp/*/kernel (transposed)
  ...layer.{j}.layer_norm, {stack}.final_layer_norm    [D]          .../*_norm/scale
  lm_head                                              [V, D]       decoder/lm_head/kernel [D, V]
(every name ends in `.weight`).

HF Linear weights are [out, in]; ours are einsum kernels [in, ...out], so the mapping is a transpose
plus a reshape of the head axis (HF's head-major `view(B, T, N, H)`).

Output layer. ModelConfig.tie_embeddings=True is T5 1.0: logits from the shared embedding with the
`d_model ** -0.5` rescale; False is T5 1.1: a separate lm_head, no rescale. transformers 5.x always
ties `lm_head` to `shared` unless the file holds a different `lm_head.weight`, and records the
rescale in `scale_decoder_outputs` (older versions: `tie_word_embeddings`). On import, a checkpoint
without rescale is read as tie_embeddings=False, with lm_head = `lm_head.weight` or, when the file
has none, `shared.weight` (the same function). Rescale with a separate, different `lm_head.weight`
has no t5like form and is an error.

Dtypes. Import reads float32 / bfloat16 / float16 tensors and casts them to the config's parameter
dtype (float32 for the default 'f32' policy: exact). Export writes float32 by default (bfloat16
params are upcast, exactly), or bfloat16 with `dtype='bfloat16'` (f32 params are rounded).

Not representable in HF T5, so export raises ConversionError: decoder-only models, RoPE, shared
layers (`shared_layer_groups`), quantised weights or activations, fake quantisation (qat).

Ignored on import, as transformers ignores it: the unused
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` of old checkpoints.
Accepted on import if equal to `shared.weight`: `encoder.embed_tokens.weight`,
`decoder.embed_tokens.weight` (and `lm_head.weight` of a tied, rescaled model).

Everything is checked (config fields, every tensor name, shape and dtype) before tensor data is
read, and the result is checked against `abstract_params(cfg)` before it is returned. Export
writes into a temporary folder next to the target and renames it into place.

Only numpy and `safetensors.numpy` are used: no torch. Nothing here exists in a well-kept library
for linen's scanned layout (transformers' Flax T5 was removed in 5.x and never used nn.scan).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from t5like import precision
from t5like.config import ConfigError, ModelConfig, from_dict
from t5like.models.transformer import abstract_params

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
WEIGHTS_INDEX_FILE = 'model.safetensors.index.json'


class ConversionError(ValueError):
  """A checkpoint, config or parameter tree cannot be converted; the message names the culprit."""


# HF `feed_forward_proj` -> ModelConfig.ffn_activation. HF maps 'gated-gelu' to the tanh
# approximation ('gelu_new'), as flax's nn.gelu (approximate=True) does.
_FFN_FROM_HF = {'relu': 'relu', 'gated-gelu': 'gated-gelu', 'gated-gelu_new': 'gated-gelu',
                'gelu_new': 'gelu', 'gated-silu': 'swiglu'}
_FFN_TO_HF = {'relu': 'relu', 'gated-gelu': 'gated-gelu', 'gelu': 'gelu_new',
              'swiglu': 'gated-silu'}
_MODEL_TYPES = ('t5', 'mt5')   # same parameter layout; export always writes 't5'
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16),
                 np.dtype(np.float64))
_EXPORT_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}

_IGNORED = ('decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)
_SHARED = 'shared.weight'
_LM_HEAD = 'lm_head.weight'
_EMBED_DUPLICATES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One HF tensor: its name and shape, where it lives in our tree, and how it is laid out.

  kind: 'same' (identical layout), 'T' (transpose), 'qkv' ([N*H, D] <-> [D, N, H]),
  'out' ([D, N*H] <-> [N, H, D]). `layer` is the index on the leading [L] axis, or None.
  """
  hf_name: str
  path: tuple[str, ...]
  layer: int | None
  kind: str
  hf_shape: tuple[int, ...]


def _specs(cfg: ModelConfig) -> list[_Spec]:
  """Every HF tensor of `cfg` (without optional duplicates), in HF's module order."""
  D, N, H, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  K = cfg.relative_attention_num_buckets
  specs = [_Spec(_SHARED, ('shared_embedding', 'embedding'), None, 'same', (V, D))]

  def attention(prefix, path, i):
    for hf, ours in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      specs.append(_Spec(f'{prefix}.{hf}.weight', path + (ours, 'kernel'), i, 'qkv', (N * H, D)))
    specs.append(_Spec(f'{prefix}.o.weight', path + ('out', 'kernel'), i, 'out', (D, N * H)))

  def mlp(prefix, path, i):
    wi = ('wi_0', 'wi_1') if cfg.ffn_activation in ('gated-gelu', 'swiglu') else ('wi',)
    for name in wi:
      specs.append(_Spec(f'{prefix}.{name}.weight', path + (name, 'kernel'), i, 'T', (F, D)))
    specs.append(_Spec(f'{prefix}.wo.weight', path + ('wo', 'kernel'), i, 'T', (D, F)))

  def norm(prefix, path, i=None):
    specs.append(_Spec(f'{prefix}.weight', path + ('scale',), i, 'same', (D,)))

  stacks = (('encoder', cfg.num_encoder_layers), ('decoder', cfg.num_decoder_layers))
  for stack, num_layers in stacks:
    layer = (stack, 'stack', 'layers', 'layer')
    for i in range(num_layers):
      p = f'{stack}.block.{i}.layer'
      if stack == 'encoder':
        attention(f'{p}.0.SelfAttention', layer + ('attention',), i)
        norm(f'{p}.0.layer_norm', layer + ('pre_attention_norm',), i)
        mlp(f'{p}.1.DenseReluDense', layer + ('mlp',), i)
        norm(f'{p}.1.layer_norm', layer + ('pre_mlp_norm',), i)
      else:
        attention(f'{p}.0.SelfAttention', layer + ('self_attention',), i)
        norm(f'{p}.0.layer_norm', layer + ('pre_self_attention_norm',), i)
        attention(f'{p}.1.EncDecAttention', layer + ('cross_attention',), i)
        norm(f'{p}.1.layer_norm', layer + ('pre_cross_attention_norm',), i)
        mlp(f'{p}.2.DenseReluDense', layer + ('mlp',), i)
        norm(f'{p}.2.layer_norm', layer + ('pre_mlp_norm',), i)
      if i == 0:
        specs.append(_Spec(f'{p}.0.SelfAttention.relative_attention_bias.weight',
                           (stack, 'relpos_bias', 'rel_embedding'), None, 'T', (K, N)))
    norm(f'{stack}.final_layer_norm', (stack, 'final_norm'))
  if not cfg.tie_embeddings:
    specs.append(_Spec(_LM_HEAD, ('decoder', 'lm_head', 'kernel'), None, 'T', (V, D)))
  return specs


def _to_ours(spec: _Spec, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
  if spec.kind == 'qkv':
    return w.T.reshape(D, N, H)
  if spec.kind == 'out':
    return w.T.reshape(N, H, D)
  return w.T if spec.kind == 'T' else w


def _to_hf(spec: _Spec, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
  if spec.kind == 'qkv':
    return x.reshape(D, N * H).T
  if spec.kind == 'out':
    return x.reshape(N * H, D).T
  return x.T if spec.kind == 'T' else x


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: Mapping[str, Any], name: str = 'hf_t5', where: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  """ModelConfig of an HF T5 config dict; absent optional fields take T5Config's defaults."""
  model_type = hf.get('model_type', 't5')
  if model_type not in _MODEL_TYPES:
    raise ConversionError(f'{where}: model_type={model_type!r} is not a T5 model; '
                          f'supported: {list(_MODEL_TYPES)}')
  if hf.get('is_encoder_decoder', True) is not True:
    raise ConversionError(f'{where}: is_encoder_decoder={hf["is_encoder_decoder"]!r}; only '
                          'T5ForConditionalGeneration (encoder-decoder) checkpoints are supported')
  missing = [k for k in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers', 'num_heads')
             if hf.get(k) is None]
  if missing:
    raise ConversionError(f'{where}: required field(s) {missing} missing')
  ffp = hf.get('feed_forward_proj', 'relu')
  if ffp not in _FFN_FROM_HF:
    raise ConversionError(f'{where}: feed_forward_proj={ffp!r} is not supported; '
                          f'supported: {sorted(_FFN_FROM_HF)}')
  scale = hf.get('scale_decoder_outputs')
  if scale is None:  # transformers < 5: the rescale follows tie_word_embeddings
    scale = hf.get('tie_word_embeddings', True)
  pad_id = hf.get('pad_token_id', 0)
  eos_id = hf.get('eos_token_id', 1)
  if isinstance(eos_id, list):
    if len(eos_id) != 1:
      raise ConversionError(f'{where}: eos_token_id={eos_id!r}; t5like takes one EOS id')
    eos_id = eos_id[0]
  start_id = hf.get('decoder_start_token_id')
  num_layers = hf['num_layers']
  num_decoder_layers = hf.get('num_decoder_layers')
  values = dict(
      name=name, arch='encdec', vocab_size=hf['vocab_size'], d_model=hf['d_model'],
      num_heads=hf['num_heads'], head_dim=hf['d_kv'], d_ff=hf['d_ff'],
      num_encoder_layers=num_layers,
      num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
      ffn_activation=_FFN_FROM_HF[ffp], tie_embeddings=bool(scale), position='relative',
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      dropout_rate=hf.get('dropout_rate', 0.1),
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
      pad_id=pad_id, eos_id=eos_id, decoder_start_id=pad_id if start_id is None else start_id)
  values.update(overrides)
  try:
    return from_dict(ModelConfig, values, prefix=where)
  except ConfigError as e:
    raise ConversionError(str(e)) from None


def config_to_hf(cfg: ModelConfig, dtype: str = 'float32') -> dict[str, Any]:
  """The config.json dict that transformers' T5ForConditionalGeneration loads for `cfg`."""
  check_exportable(cfg)
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'is_encoder_decoder': True,
      'vocab_size': cfg.vocab_size,
      'd_model': cfg.d_model,
      'd_kv': cfg.head_dim,
      'd_ff': cfg.d_ff,
      'num_layers': cfg.num_encoder_layers,
      'num_decoder_layers': cfg.num_decoder_layers,
      'num_heads': cfg.num_heads,
      'relative_attention_num_buckets': cfg.relative_attention_num_buckets,
      'relative_attention_max_distance': cfg.relative_attention_max_distance,
      'dropout_rate': cfg.dropout_rate,
      'layer_norm_epsilon': cfg.layer_norm_epsilon,
      'initializer_factor': 1.0,
      'feed_forward_proj': _FFN_TO_HF[cfg.ffn_activation],
      # transformers < 5 reads the rescale from tie_word_embeddings, >= 5 from
      # scale_decoder_outputs (and unties lm_head when the file holds a different one).
      'tie_word_embeddings': cfg.tie_embeddings,
      'scale_decoder_outputs': cfg.tie_embeddings,
      'pad_token_id': cfg.pad_id,
      'eos_token_id': cfg.eos_id,
      'decoder_start_token_id': cfg.decoder_start_id,
      'use_cache': True,
      'dtype': dtype,
      'torch_dtype': dtype,
  }


def check_exportable(cfg: ModelConfig) -> None:
  """Raises ConversionError naming the first field of `cfg` that HF T5 cannot represent."""
  problems = [
      (cfg.arch != 'encdec', f"model.arch={cfg.arch!r}: HF T5 is an encoder-decoder ('encdec')"),
      (cfg.position != 'relative', f'model.position={cfg.position!r}: HF T5 has only relative '
                                   'position bias'),
      (cfg.shared_layer_groups != 0, f'model.shared_layer_groups={cfg.shared_layer_groups}: HF T5 '
                                     'has no cross-layer sharing; unshare the layers first'),
      (cfg.quant.weights != 'none', f'model.quant.weights={cfg.quant.weights!r}: HF T5 holds '
                                    'float weights; dequantise first'),
      (cfg.quant.activations != 'none', f'model.quant.activations={cfg.quant.activations!r} has '
                                        'no HF T5 equivalent'),
      (cfg.quant.qat != 'none', f"model.quant.qat={cfg.quant.qat!r}: HF T5 has no fake "
                                "quantisation; export with cfg.with_quant(qat='none') to write the "
                                'float weights'),
      (cfg.ffn_activation not in _FFN_TO_HF, f'model.ffn_activation={cfg.ffn_activation!r} has '
                                             'no HF T5 feed_forward_proj'),
  ]
  for bad, message in problems:
    if bad:
      raise ConversionError(f'cannot export to HF T5: {message}')


# ----------------------------------------------------------------------------------------------
# Import


class _Tensors:
  """Names, shapes and dtypes of a checkpoint's tensors (headers only until `get`)."""

  def __init__(self, folder: str):
    single = os.path.join(folder, WEIGHTS_FILE)
    index = os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f'{index}: not a valid safetensors index ({e})') from None
      files = sorted({os.path.join(folder, v) for v in weight_map.values()})
    else:
      raise ConversionError(f'{folder}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found')
    self.where: dict[str, str] = {}
    self.shape: dict[str, tuple[int, ...]] = {}
    self.dtype: dict[str, str] = {}
    for path in files:
      try:
        with safe_open(path, framework='np') as f:
          for name in f.keys():
            if name in self.where:
              raise ConversionError(f'tensor {name!r} appears in both {self.where[name]} and '
                                    f'{path}')
            sl = f.get_slice(name)
            self.where[name], self.shape[name], self.dtype[name] = (
                path, tuple(sl.get_shape()), sl.get_dtype())
      except ConversionError:
        raise
      except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ConversionError(f'{path}: cannot read safetensors header ({e})') from None
    self._open: dict[str, Any] = {}

  def get(self, name: str) -> np.ndarray:
    path = self.where[name]
    if path not in self._open:
      self._open[path] = safe_open(path, framework='np')
    return self._open[path].get_tensor(name)


def _read_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isdir(folder):
    raise ConversionError(f'checkpoint folder {folder!r} does not exist')
  if not os.path.isfile(path):
    raise ConversionError(f'{folder}: no {CONFIG_FILE}; an HF T5 folder holds {CONFIG_FILE} and '
                          f'{WEIGHTS_FILE}')
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(hf, dict):
    raise ConversionError(f'{path}: expected a JSON object, got {type(hf).__name__}')
  return hf


def _shape_error(name: str, got, want, where: str) -> ConversionError:
  return ConversionError(f'tensor {name!r} in {where} has shape {list(got)}, expected {list(want)} '
                         'from config.json')


def import_hf_t5(folder: str, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from an HF T5 checkpoint folder (config.json + model.safetensors).

  `overrides` are ModelConfig fields set on top of config.json (e.g. precision='bf16',
  dropout_rate=0.0); ones that change parameter shapes fail the shape checks. Params are a nested
  dict of host numpy arrays in the policy's param dtype, in the tree of `init_params(cfg, ...)`;
  place them with `jax.device_put` (with shardings for a large model).
  """
  folder = os.fspath(folder)
  hf = _read_config(folder)
  name = os.path.basename(os.path.normpath(folder)) or 'hf_t5'
  cfg = config_from_hf(hf, name=name, where=os.path.join(folder, CONFIG_FILE), **overrides)
  check_exportable(cfg)   # overrides could ask for something HF weights cannot fill
  tensors = _Tensors(folder)
  where = tensors.where.__getitem__

  specs = _specs(cfg)
  expected = {s.hf_name: s for s in specs}
  # A model without rescale and without lm_head.weight in the file: lm_head = shared (HF 5.x ties).
  lm_head_from_shared = not cfg.tie_embeddings and _LM_HEAD not in tensors.where
  if lm_head_from_shared:
    del expected[_LM_HEAD]
  duplicates = list(_EMBED_DUPLICATES) + ([_LM_HEAD] if cfg.tie_embeddings else [])
  known = set(expected) | set(duplicates) | set(_IGNORED)
  unknown = sorted(set(tensors.where) - known)
  if unknown:
    raise ConversionError(f'unknown tensor name(s) in {folder}: {unknown[:10]}'
                          f'{" ..." if len(unknown) > 10 else ""} (not part of a '
                          f'T5ForConditionalGeneration with this config.json)')
  missing = [n for n in expected if n not in tensors.where]
  if missing:
    raise ConversionError(f'missing tensor(s) in {folder}: {missing[:10]}'
                          f'{" ..." if len(missing) > 10 else ""}')
  for n in list(expected) + [d for d in duplicates if d in tensors.where]:
    want = expected[n].hf_shape if n in expected else expected[_SHARED].hf_shape
    if tensors.shape[n] != want:
      raise _shape_error(n, tensors.shape[n], want, where(n))
  for n in tensors.where:
    if n not in _IGNORED and np.dtype(_np_dtype(tensors.dtype[n], n)) not in _FLOAT_DTYPES:
      raise ConversionError(f'tensor {n!r} in {where(n)} has dtype {tensors.dtype[n]}; expected a '
                            'float dtype (quantised checkpoints are not supported)')

  # Headers are valid: read the data.
  param_dtype = np.dtype(precision.get_policy(cfg.precision).param_dtype)
  shared = tensors.get(_SHARED)
  for n in duplicates:
    if n in tensors.where and not np.array_equal(tensors.get(n), shared):
      if n == _LM_HEAD:
        raise ConversionError(
            f'{n!r} in {where(n)} differs from {_SHARED!r}, but config.json asks for the tied '
            'output rescale (tie_word_embeddings / scale_decoder_outputs true): t5like has no '
            'separate lm_head with rescale; fix config.json or the checkpoint')
      raise ConversionError(f'{n!r} in {where(n)} differs from {_SHARED!r}; T5 shares one '
                            'embedding between encoder, decoder and (1.0) output')
  per_leaf: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
  for s in specs:
    w = shared if (s.hf_name == _SHARED or (s.hf_name == _LM_HEAD and lm_head_from_shared)) \
        else tensors.get(s.hf_name)
    per_leaf.setdefault(s.path, {})[s.layer] = _to_ours(s, w, cfg).astype(param_dtype)
  params: dict = {}
  for path, by_layer in per_leaf.items():
    leaf = by_layer[None] if None in by_layer else np.stack([by_layer[i] for i in
                                                             range(len(by_layer))])
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(leaf)
  _check_tree(cfg, params, 'imported params')
  return cfg, params


def _np_dtype(st_dtype: str, name: str):
  table = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}
  if st_dtype not in table:
    raise ConversionError(f'tensor {name!r} has unsupported dtype {st_dtype}')
  return table[st_dtype]


def _check_tree(cfg: ModelConfig, params, what: str) -> None:
  """Raises ConversionError unless `params` has exactly the paths and shapes of `cfg`'s model."""
  want = {jax.tree_util.keystr(k): v.shape for k, v in
          jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in
         jax.tree_util.tree_flatten_with_path(params)[0]}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ConversionError(f'{what} do not match model {cfg.name!r}: missing {missing[:5]}, '
                          f'unexpected {extra[:5]}')
  for k, shape in want.items():
    if tuple(got[k]) != tuple(shape):
      raise ConversionError(f'{what}: {k} has shape {list(got[k])}, the config needs {list(shape)}')


# ----------------------------------------------------------------------------------------------
# Export


def export_hf_t5(cfg: ModelConfig, params, folder: str, dtype: str = 'float32',
                 overwrite: bool = False, spiece_model: bytes | None = None) -> None:
  """Writes `params` of `cfg` as an HF T5 folder (config.json + model.safetensors).

  With `spiece_model` (a T5-layout SentencePiece model's bytes: `Tokenizer.model_proto`), the
  tokenizer files are written too (spiece.model, tokenizer_config.json, special_tokens_map.json),
  so `T5Tokenizer` / `AutoTokenizer.from_pretrained(folder)` load it with the 100 sentinels. (HF's
  converted tokenizer has no byte fallback: characters outside the pieces become <unk> there.)

  dtype: 'float32' (default; exact for f32 and bf16 params) or 'bfloat16'. The folder is built
  next to `folder` and renamed into place; an existing non-empty folder is an error unless
  `overwrite`, in which case it is replaced only once the new one is complete.
  """
  folder = os.path.abspath(os.fspath(folder))
  if dtype not in _EXPORT_DTYPES:
    raise ConversionError(f'export dtype={dtype!r} is not supported; choose one of '
                          f'{sorted(_EXPORT_DTYPES)}')
  hf_config = config_to_hf(cfg, dtype)   # checks the config is representable
  if isinstance(params, Mapping) and 'params' in params and len(params) == 1:
    raise ConversionError("export_hf_t5 takes the params tree, not {'params': ...}; pass "
                          "variables['params']")
  _check_tree(cfg, params, 'params')
  occupied = os.path.lexists(folder) and not (os.path.isdir(folder) and not os.listdir(folder))
  if occupied and not overwrite:
    raise ConversionError(f'{folder} already exists and is not empty; pass overwrite=True to '
                          'replace it')

  flat = {tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  out_dtype = _EXPORT_DTYPES[dtype]
  tensors = {}
  for s in _specs(cfg):
    x = np.asarray(jax.device_get(flat[s.path]))
    if x.dtype not in _FLOAT_DTYPES:
      raise ConversionError(f'params: {"/".join(s.path)} has dtype {x.dtype}; expected floats')
    if s.layer is not None:
      x = x[s.layer]
    tensors[s.hf_name] = np.ascontiguousarray(_to_hf(s, x, cfg).astype(out_dtype))

  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(folder)}.tmp-', dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
      f.write('\n')
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={'format': 'pt'})
    if spiece_model is not None:
      _write_hf_tokenizer(tmp, spiece_model)
    if occupied:
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(folder)}.old-', dir=parent)
      os.replace(folder, os.path.join(old, 'folder'))
      os.replace(tmp, folder)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


HF_TOKENIZER_FILE = 'spiece.model'
_HF_SPECIAL = {'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<pad>'}


def _write_hf_tokenizer(folder: str, spiece_model: bytes) -> None:
  with open(os.path.join(folder, HF_TOKENIZER_FILE), 'wb') as f:
    f.write(spiece_model)
  extra = [f'<extra_id_{i}>' for i in range(100)]
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'T5Tokenizer', 'extra_ids': 100, 'model_max_length': 512,
               'additional_special_tokens': extra, **_HF_SPECIAL}, f, indent=2)
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w') as f:
    json.dump({**_HF_SPECIAL, 'additional_special_tokens': extra}, f, indent=2)
