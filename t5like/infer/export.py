"""`jax.export` of the batched decode step for one fixed shape: serialised, reloaded, run anywhere.

  exported = export_decode_step(cfg, batch=8, max_decode_len=129, encoder_len=256)
  save(exported, 'decode_step.jaxexp'); step = load('decode_step.jaxexp')
  logits_B1V, cache = step.call(params, cache, tokens_B1)

The step is the engine's: append one token per row at each row's cache index and return the
logits and the updated cache (`build_model(cfg).apply(..., method='decode_step')`). Parameters are
arguments, not constants, so the artefact is small and one export serves every checkpoint of the
config (a quantised config exports its integer kernels' shapes). The serialised form is StableHLO
with its calling convention (jax.export's versioned format): a process that loads it needs jax,
not t5like or the model code. `platforms` defaults to the current backend; pass e.g.
('cpu', 'cuda') for a multi-platform artefact.

CLI for a served bundle: `python scripts/export_decode_step.py --bundle=models/tiny/1
--out=step.jaxexp --batch=8`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from t5like.config import ModelConfig
from t5like.models import abstract_params, build_model, init_cache


def decode_step_fn(cfg: ModelConfig):
  model = build_model(cfg)

  def step(params, cache, tokens_B1):
    return model.apply({'params': params}, tokens_B1, cache, method='decode_step')
  return step


def abstract_args(cfg: ModelConfig, batch: int, max_decode_len: int, encoder_len: int = 0,
                  params_shape=None):
  """ShapeDtypeStructs of (params, cache, tokens) the exported step takes."""
  params = params_shape if params_shape is not None else abstract_params(cfg)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_decode_len, encoder_len))
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(shape, params), jax.tree.map(shape, cache), tokens


def export_decode_step(cfg: ModelConfig, *, batch: int, max_decode_len: int, encoder_len: int = 0,
                       params=None, platforms: Sequence[str] | None = None) -> jax.export.Exported:
  """Exports the decode step for [batch, 1] tokens and a cache of `max_decode_len` positions
  (encoder-decoder models: plus `encoder_len` source positions). `params` (arrays or shapes)
  gives the parameter shapes when they are not the config's float ones."""
  if cfg.is_encdec and encoder_len <= 0:
    raise ValueError(f'model {cfg.name!r} is encoder-decoder: pass encoder_len > 0 (the source '
                     'length its cross-attention cache holds)')
  if batch <= 0 or max_decode_len <= 0:
    raise ValueError(f'batch and max_decode_len must be positive, got {batch}, {max_decode_len}')
  args = abstract_args(cfg, batch, max_decode_len, encoder_len, params)
  return jax.export.export(jax.jit(decode_step_fn(cfg)), platforms=platforms)(*args)


def save(exported: jax.export.Exported, path: str) -> None:
  with open(path, 'wb') as f:
    f.write(exported.serialize())


def load(path: str) -> jax.export.Exported:
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))
