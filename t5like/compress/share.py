"""Parameter sharing: cross-layer (ALBERT) and output-embedding tying, as transforms on params.

Cross-layer sharing is a model feature (`ModelConfig.shared_layer_groups` = G: the L layers of each
stack are G groups of L/G consecutive layers, each group one set of weights, so every stacked
parameter has leading axis G instead of L). `share_layers` turns a trained unshared (or otherwise
grouped) tree into the tree of that model, taking each group's mean or its first layer, and returns
the new ModelConfig; `unshare_layers` repeats each group's weights and is exact (same outputs). The
result is an ordinary parameter tree of an ordinary ModelConfig: it trains, checkpoints and counts
(`t5like.models.param_count`) like any other.

Embeddings: the encoder and decoder always read one table ('shared_embedding', as in T5);
`tie_output_embedding` makes the output layer that table too (`ModelConfig.tie_embeddings`, T5
1.0: logits = (h * d_model**-0.5) @ E^T) and drops 'lm_head'; `untie_output_embedding` is its exact
inverse direction (lm_head = E^T * d_model**-0.5). These shape-changing steps return the new config,
like surgery. Written here: no library knows T5's stacked layout.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import traverse_util

from t5like.compress import prune
from t5like.config import ConfigError, ModelConfig
from t5like.models import abstract_params

STACKED = prune.STACKED


def _layers_of(path: str, cfg: ModelConfig) -> int:
  return cfg.num_encoder_layers if path.startswith('encoder/') else cfg.num_decoder_layers


def _check(params, cfg: ModelConfig, where: str):
  want = traverse_util.flatten_dict(abstract_params(cfg), sep='/')
  got = traverse_util.flatten_dict(params, sep='/')
  for k in set(want) | set(got):
    if k not in want or k not in got or tuple(want[k].shape) != tuple(got[k].shape):
      raise ValueError(f"{where}: parameter '{k}' has shape "
                       f'{getattr(got.get(k), "shape", None)} but the model of the new config has '
                       f'{getattr(want.get(k), "shape", None)}')


def unshare_layers(params, cfg: ModelConfig):
  """(params with one set of weights per layer, cfg with shared_layer_groups=0); exact."""
  if not cfg.shared_layer_groups:
    return params, cfg
  flat = traverse_util.flatten_dict(params, sep='/')
  out = {}
  for k, v in flat.items():
    if STACKED in '/' + k:
      G, L = cfg.shared_layer_groups, _layers_of(k, cfg)
      if v.shape[0] != G:
        raise ValueError(f"unshare_layers: '{k}' has leading axis {v.shape[0]}, expected "
                         f'model.shared_layer_groups={G}')
      v = jnp.repeat(v, L // G, axis=0)
    out[k] = v
  new_cfg = cfg.replace(shared_layer_groups=0)
  new = traverse_util.unflatten_dict(out, sep='/')
  _check(new, new_cfg, 'unshare_layers')
  return new, new_cfg


def share_layers(params, cfg: ModelConfig, groups: int, method: str = 'mean'):
  """(params of the model whose layers form `groups` shared groups, its cfg).

  method 'mean' averages the layers of a group, 'first' keeps the group's first layer. groups=0
  unshares. A cfg that is already shared is first unshared (each group repeated), then regrouped.
  """
  if method not in ('mean', 'first'):
    raise ConfigError(f"share_layers: method={method!r} is not valid; choose 'mean' or 'first'")
  params, cfg = unshare_layers(params, cfg)
  if groups == 0:
    return params, cfg
  new_cfg = cfg.replace(shared_layer_groups=groups)   # validates that groups divides L
  flat = traverse_util.flatten_dict(params, sep='/')
  out = {}
  for k, v in flat.items():
    if STACKED in '/' + k:
      L = _layers_of(k, cfg)
      v = v.reshape((groups, L // groups) + v.shape[1:])
      v = v.mean(axis=1).astype(v.dtype) if method == 'mean' else v[:, 0]
    out[k] = v
  new = traverse_util.unflatten_dict(out, sep='/')
  _check(new, new_cfg, 'share_layers')
  return new, new_cfg


def _set(tree: dict, path: str, value):
  """A copy of nested dict `tree` with `path` set to `value` (None deletes it)."""
  head, *rest = path.split('/')
  tree = dict(tree)
  if rest:
    tree[head] = _set(tree[head], '/'.join(rest), value)
  elif value is None:
    tree.pop(head)
  else:
    tree[head] = value
  return tree


def tie_output_embedding(params, cfg: ModelConfig, method: str = 'input'):
  """(params without 'decoder/lm_head', cfg with tie_embeddings=True).

  method 'input' keeps the input table as it is; 'average' sets it to the mean of the input table
  and the output layer expressed as a table (lm_head^T * sqrt(d_model)). Neither is exact: one
  table now serves both ends, so fine-tune afterwards.
  """
  if cfg.tie_embeddings:
    raise ConfigError('tie_output_embedding: model.tie_embeddings is already True')
  if method not in ('input', 'average'):
    raise ConfigError(f"tie_output_embedding: method={method!r}; choose 'input' or 'average'")
  head = params['decoder']['lm_head']['kernel']
  emb = params['shared_embedding']['embedding']
  if method == 'average':
    emb = ((emb + head.T * cfg.d_model ** 0.5) / 2).astype(emb.dtype)
  new = _set(_set(params, 'decoder/lm_head', None), 'shared_embedding/embedding', emb)
  new_cfg = cfg.replace(tie_embeddings=True)
  _check(new, new_cfg, 'tie_output_embedding')
  return new, new_cfg


def untie_output_embedding(params, cfg: ModelConfig):
  """(params with a separate 'decoder/lm_head' = E^T * d_model**-0.5, cfg tie_embeddings=False);
  the logits are unchanged."""
  if not cfg.tie_embeddings:
    raise ConfigError('untie_output_embedding: model.tie_embeddings is already False')
  emb = params['shared_embedding']['embedding']
  head = (emb.T * cfg.d_model ** -0.5).astype(emb.dtype)
  new = _set(params, 'decoder/lm_head', {'kernel': head})
  new_cfg = cfg.replace(tie_embeddings=False)
  _check(new, new_cfg, 'untie_output_embedding')
  return new, new_cfg


def shared_param_savings(cfg: ModelConfig, groups: int) -> int:
  """How many parameters `share_layers(..., groups)` removes from an unshared model of `cfg`."""
  flat = traverse_util.flatten_dict(abstract_params(cfg.replace(shared_layer_groups=0)), sep='/')
  saved = 0
  for k, v in flat.items():
    if STACKED in '/' + k:
      L = _layers_of(k, cfg)
      saved += (L - groups) * (v.size // L)
  return int(saved)
