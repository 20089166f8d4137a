"""Surgery: turn structured masks into a physically smaller model (new ModelConfig + sliced params).

`shrink(params, masks, cfg) -> (params', cfg', report)` removes every attention head and FFN
neuron the masks remove outright (`prune.unit_masks_of`) and gives a model whose outputs equal
those of `apply_masks(params, masks)` under `cfg` (unstructured zeros inside kept units stay zero).

ModelConfig has one `num_heads` for every attention module and one `d_ff` for every FFN, and the
relative position bias table [N, buckets] of a stack is shared by all its layers. Therefore:
- every module keeps the same number of heads k_heads (and FFNs the same k_ff): the largest count
  any layer keeps; a layer that keeps fewer also keeps some of its pruned units, still all zero,
  to fill up (reported as 'padded_*'), so the equivalence stays exact;
- in a stack with a relative bias table, the self-attention must keep the same head indices in
  every layer (so the table's rows can be sliced once): the kept set there is the union over
  layers. Cross-attention (no bias) and RoPE models keep their heads per layer.
Structured masks from `prune.structured_unit_masks(scope='layer', tie_relpos_heads=True)` meet
both conditions, so their surgery pads nothing. Other masks still shrink exactly, just less.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5like.compress import prune
from t5like.config import ModelConfig
from t5like.models import abstract_params, param_count


def _select(present: np.ndarray, k: int) -> np.ndarray:
  """k indices per row: the present units, then the lowest absent ones, ascending."""
  rows = []
  for row in present:
    kept = np.flatnonzero(row)
    fill = np.flatnonzero(~row)[:k - kept.size]
    rows.append(np.sort(np.concatenate([kept, fill]))[:k])
  return np.stack(rows).astype(np.int32)


def _gather(x, idx_LK: np.ndarray, axis: int):
  return jnp.stack([jnp.take(x[l], jnp.asarray(idx_LK[l]), axis=axis - 1)
                    for l in range(x.shape[0])])


def shrink(params, masks, cfg: ModelConfig):
  """(smaller params, ModelConfig with fewer heads / smaller d_ff, report); see module docstring."""
  if cfg.quant.weights != 'none':
    raise ValueError('surgery.shrink needs float weights; shrink before quantising '
                     f'(model.quant.weights={cfg.quant.weights!r})')
  params = prune.apply_masks(params, masks)
  flat = traverse_util.flatten_dict(params, sep='/')
  attn, mlp = prune.attention_modules(flat), prune.mlp_modules(flat)
  present = {m: np.asarray(v) for m, v in prune.unit_masks_of(params, masks, attn + mlp).items()}
  tied = set(prune.relpos_tied_modules(params, attn))
  own = dict(present)                         # before tying: for the padding count
  for m in tied:
    present[m] = np.broadcast_to(present[m].any(0), present[m].shape)

  def kept(mods):
    return max([1] + [int(present[m].sum(1).max()) for m in mods])

  k_heads, k_ff = kept(attn), kept(mlp)
  new = dict(flat)
  report = {'num_heads': [cfg.num_heads, k_heads], 'd_ff': [cfg.d_ff, k_ff],
            'padded_heads': 0, 'padded_neurons': 0}
  for mod in attn + mlp:
    k = k_heads if mod in attn else k_ff
    idx = _select(present[mod], k)
    pad = int(k * own[mod].shape[0] - own[mod].sum())
    report['padded_heads' if mod in attn else 'padded_neurons'] += pad
    for path, axis in prune.unit_members(flat, mod):
      new[path] = _gather(flat[path], idx, axis)
    if mod in tied:
      table = f"{mod.split('/stack/')[0]}/relpos_bias/rel_embedding"
      new[table] = jnp.take(flat[table], jnp.asarray(idx[0]), axis=0)
  new_cfg = cfg.replace(num_heads=k_heads, d_ff=k_ff)
  new_params = traverse_util.unflatten_dict(new, sep='/')
  expected = traverse_util.flatten_dict(abstract_params(new_cfg), sep='/')
  for k, v in traverse_util.flatten_dict(new_params, sep='/').items():
    if k not in expected or tuple(expected[k].shape) != tuple(v.shape):
      raise ValueError(f"surgery produced parameter '{k}' of shape {v.shape}, but a model of "
                       f'num_heads={k_heads}, d_ff={k_ff} has '
                       f'{None if k not in expected else expected[k].shape}')
  report['params'] = [param_count(params), param_count(new_params)]
  return new_params, new_cfg, report
