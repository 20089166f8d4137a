"""Quantisation as pytree transforms: float params -> quantised params, and their byte counts.

  qparams, qcfg = quantize_params(params, cfg, 'int4', group_size=32)
  build_model(qcfg).apply({'params': qparams}, ...)   # the quantised layers of models/quant.py

Schemes: 'int8' (one scale per output channel) and 'int4' (group-wise along the contraction),
`scale_dtype` float32 or bfloat16; `activation_quant` 'none', 'dynamic' or 'static' (calibrated
input scales: pass `calibration_inputs`). The stored layouts and the arithmetic are described in
t5like/models/quant.py; the pytree (int8 / uint8 / float leaves) checkpoints with orbax like any
other.

How conversion works: `quantize_params` runs the quantised model once (on dummy or calibration
inputs) with the float parameters present and the 'params' collection mutable; each quantised
layer sees its float `kernel`, creates `qkernel` / `qscale` (and `act_scale`, from the input it
sees) from it, and returns the float result so that later layers calibrate on float activations.
The float kernels are then dropped. This is the models' own code path, so every projection of
every architecture (scanned and shared layer stacks included) is covered, and it is jittable and
`jax.eval_shape`-able.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5like.config import ConfigError, ModelConfig
from t5like.models import quant, transformer
from t5like.train import step as step_lib

SCHEMES = quant.SCHEMES
_SCALE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# ----------------------------------------------------------------------------- pytree transforms

def _model_args(cfg: ModelConfig, inputs):
  """(positional, keyword) model arguments from a T5X batch dict or a tuple of token arrays."""
  if not isinstance(inputs, Mapping):
    return tuple(inputs), {}
  return step_lib.model_args(cfg, inputs)


def quantize_params(params, cfg: ModelConfig, scheme: str = 'int8', *, group_size: int | None = None,
                    scale_dtype: str = 'float32', activation_quant: str | None = None,
                    calibration_inputs: Any = None) -> tuple[dict, ModelConfig]:
  """Float params -> (quantised params, the ModelConfig that runs them). Jittable, eval_shape-able.

  scheme: 'int8' (per output channel) or 'int4' (group-wise, `group_size` along the contraction,
  default `cfg.quant.group_size`); scale_dtype: 'float32' or 'bfloat16';
  activation_quant: None keeps `cfg.quant.activations`, else 'none' / 'dynamic' / 'static';
  calibration_inputs: a batch dict (T5X keys) or a tuple of model inputs, required for 'static'
  (the input scales are the absmax over it / 127).
  """
  if scheme not in SCHEMES:
    raise ConfigError(f'quantisation scheme {scheme!r} is not valid; choose one of {list(SCHEMES)}')
  if cfg.quant.weights != 'none':
    raise ConfigError(f'params are already quantised (model.quant.weights='
                      f'{cfg.quant.weights!r}); quantise the float params of the model')
  if scale_dtype not in _SCALE_DTYPES:
    raise ConfigError(f'scale_dtype={scale_dtype!r} is not valid; choose one of '
                      f'{sorted(_SCALE_DTYPES)}')
  act = cfg.quant.activations if activation_quant is None else activation_quant
  qcfg = cfg.with_quant(weights=scheme, activations=act, qat='none',
                        group_size=group_size or cfg.quant.group_size)
  if act == 'static' and calibration_inputs is None:
    raise ConfigError("activation_quant='static' needs calibration_inputs (a batch of typical "
                      "inputs) to set the input scales")
  if calibration_inputs is None:
    calibration_inputs = transformer.dummy_inputs(cfg)
  args, kwargs = _model_args(cfg, calibration_inputs)
  if 'shared_embedding' not in params or 'embedding' not in params['shared_embedding']:
    raise ValueError(f'quantize_params: expected float params with shared_embedding/embedding; '
                     f'got top-level keys {sorted(params)}')
  params = dict(params)
  emb = dict(params['shared_embedding'])
  emb['quant'] = {'embedding': emb.pop('embedding')}
  params['shared_embedding'] = emb
  model = transformer.build_model(qcfg)
  _, variables = model.apply({'params': params}, *args, **kwargs, mutable=['params'],
                             rngs={'params': jax.random.key(0)})
  out = _strip_float(nn.unbox(variables['params']))
  dtype = _SCALE_DTYPES[scale_dtype]
  out = _map_named(out, 'qscale', lambda s: s.astype(dtype))
  return out, qcfg


def _strip_float(tree):
  """Drops the float `kernel` / `embedding` that a quantised sibling replaced."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: _strip_float(v) for k, v in tree.items()}
  if 'qkernel' in out:
    out.pop('kernel', None)
  if 'qembedding' in out:
    out.pop('embedding', None)
  return out


def _map_named(tree, name: str, fn):
  if not isinstance(tree, Mapping):
    return tree
  return {k: (fn(v) if k == name and not isinstance(v, Mapping) else _map_named(v, name, fn))
          for k, v in tree.items()}


def weight_bytes(params) -> int:
  """Bytes of every leaf (arrays or jax.ShapeDtypeStruct): the stored size of the weights."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(params)))


def abstract_quantized_params(cfg: ModelConfig, scheme: str, **kw):
  """Shapes and dtypes of `quantize_params(init_params(cfg), cfg, scheme, **kw)[0]`, unallocated."""
  return jax.eval_shape(lambda p: quantize_params(p, cfg, scheme, **kw)[0],
                        transformer.abstract_params(cfg))
