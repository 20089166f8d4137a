"""Pruning: importance scores, masks (layer-wise / global / N:M / structured) and `apply_masks`.

Written here because no well-kept JAX library covers T5's stacked, per-head layout (jaxpruner is
unmaintained and knows nothing of heads, relative-bias tables or scanned layer axes).

Vocabulary:
- params are the plain nested dicts of `t5like.models.init_params`; a parameter is named by its
  '/'-joined path, e.g. 'encoder/stack/layers/layer/attention/query/kernel' [L, D, N, H].
- a **mask** tree has exactly the structure of params, with a bool array (True = kept) of each
  parameter's shape; parameters that are not prunable are all True. `apply_masks` jits.
- **prunable** parameters are those whose path matches one of `PruneConfig.include` and none of
  `PruneConfig.exclude` (re.search). The default is every projection kernel of the layer stacks;
  add 'lm_head/kernel' or 'embedding$' to prune those too. Norm scales and the relative position
  bias table never are (they are excluded even if an include regex matches them).
- **units** (structured pruning) are attention heads (axis N of query/key/value/out) and FFN
  neurons (axis F of wi / wi_0 / wi_1 / wo), one row per stacked layer: unit scores and unit masks
  are dicts {module path: [L, U]}, e.g. {'encoder/stack/layers/layer/mlp': [L, F]}.
- sparsity is always the fraction of prunable weights set to zero.

Ranking is by exact counts, never by a threshold: `round(sparsity * n)` weights (or units) with the
lowest scores are removed, ties broken by position. The counts may be traced values, so masks can be
recomputed inside a jitted optimizer update (see `t5like/compress/gradual.py`).

Scores: `magnitude_scores` (|w| or w^2), `unit_scores` (L1/L2 norm per head / neuron),
`gradient_scores` (first-order Taylor |w*g| accumulated over calibration batches, or SNIP
|w * mean g|, unstructured or per unit). Greedy unit removal lives in `t5like/compress/greedy.py`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t5like.config import ConfigError, PruneConfig, parse_nm
from t5like.models import build_model
from t5like.train import step as step_lib

NEVER_PRUNE = (r'norm', r'scale$', r'rel_embedding')
STACKED = '/stack/layers/'   # parameters under this have a leading layer (or layer-group) axis
HEAD_KERNELS = ('query', 'key', 'value', 'out')
FFN_INPUTS = ('wi', 'wi_0', 'wi_1')


# ----------------------------------------------------------------------------- selection

def prunable(params, cfg: PruneConfig = PruneConfig()) -> list[str]:
  """Paths of the parameters `cfg` may prune (an error if the regexes select none)."""
  inc = [re.compile(p) for p in cfg.include]
  exc = [re.compile(p) for p in tuple(cfg.exclude) + NEVER_PRUNE]
  flat = traverse_util.flatten_dict(params, sep='/')
  names = [k for k in flat if any(r.search(k) for r in inc) and not any(r.search(k) for r in exc)]
  if not names:
    raise ConfigError(f'prune.include={cfg.include} / exclude={cfg.exclude} select no parameter; '
                      f'parameters are e.g. {list(flat)[:4]}')
  return names


def ones_masks(params):
  return jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)


def apply_masks(params, masks):
  """Zeroes masked-out weights (jittable; masks from any function of this module)."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity(masks, names: Iterable[str] | None = None) -> dict[str, float]:
  """{'total': fraction pruned over `names` (default: every parameter), path: fraction, ...}."""
  flat = traverse_util.flatten_dict(masks, sep='/')
  names = list(flat) if names is None else list(names)
  out, pruned, total = {}, 0, 0
  for k in names:
    m = np.asarray(flat[k])
    out[k] = float(1.0 - m.mean())
    pruned += int(m.size - m.sum())
    total += m.size
  out['total'] = pruned / max(total, 1)
  return out


def _rows(name: str, x):
  """A parameter as [rows, n]: one row per stacked layer (or one row if not stacked)."""
  return x.reshape((x.shape[0], -1)) if STACKED in '/' + name and x.ndim > 1 else x.reshape((1, -1))


def _count(fraction, n: int):
  """round(fraction * n) as an int32 (fraction may be traced)."""
  return jnp.round(jnp.asarray(fraction, jnp.float32) * n).astype(jnp.int32)


def prune_lowest(scores, k, sizes=None):
  """Keep-mask over the last axis: drop the `k` lowest scores (k may be traced; ties by position).

  With `sizes`, each item has that many weights and items are dropped in score order while the
  weights dropped before them are < k (so at most one item's worth above k).
  """
  order = jnp.argsort(scores, axis=-1, stable=True)
  if sizes is None:
    return jnp.argsort(order, axis=-1, stable=True) >= k
  s = jnp.take_along_axis(jnp.broadcast_to(sizes, scores.shape), order, axis=-1)
  dropped_sorted = (jnp.cumsum(s, axis=-1) - s) < k
  keep_sorted = ~dropped_sorted
  inv = jnp.argsort(order, axis=-1, stable=True)
  return jnp.take_along_axis(keep_sorted, inv, axis=-1)


# ----------------------------------------------------------------------------- scores

def magnitude_scores(params, cfg: PruneConfig = PruneConfig()) -> dict[str, jax.Array]:
  """{path: |w| (norm='l1') or w^2 ('l2')} over the prunable parameters (same ranking per
  parameter; they differ once summed into groups)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  f = jnp.abs if cfg.norm == 'l1' else jnp.square
  return {k: f(flat[k].astype(jnp.float32)) for k in prunable(params, cfg)}


def attention_modules(flat: Mapping[str, Any]) -> list[str]:
  return [k[:-len('/query/kernel')] for k in flat if k.endswith('/query/kernel')
          and all(f'{k[:-len("/query/kernel")]}/{n}/kernel' in flat for n in HEAD_KERNELS)]


def mlp_modules(flat: Mapping[str, Any]) -> list[str]:
  return [k[:-len('/wo/kernel')] for k in flat if k.endswith('/wo/kernel')
          and any(f'{k[:-len("/wo/kernel")]}/{n}/kernel' in flat for n in FFN_INPUTS)]


def unit_members(flat: Mapping[str, Any], module: str) -> list[tuple[str, int]]:
  """(kernel path, unit axis) of every kernel a head / neuron of `module` spans."""
  if f'{module}/query/kernel' in flat:
    return [(f'{module}/{n}/kernel', flat[f'{module}/{n}/kernel'].ndim - (3 if n == 'out' else 2))
            for n in HEAD_KERNELS]
  members = [(f'{module}/{n}/kernel', flat[f'{module}/{n}/kernel'].ndim - 1) for n in FFN_INPUTS
             if f'{module}/{n}/kernel' in flat]
  return members + [(f'{module}/wo/kernel', flat[f'{module}/wo/kernel'].ndim - 2)]


def unit_modules(params, cfg: PruneConfig = PruneConfig()) -> list[str]:
  """Attention / MLP modules whose every kernel is prunable under `cfg` (and `cfg.units`)."""
  flat = traverse_util.flatten_dict(params, sep='/')
  ok = set(prunable(params, cfg))
  mods = []
  if cfg.units in ('heads', 'both'):
    mods += attention_modules(flat)
  if cfg.units in ('neurons', 'both'):
    mods += mlp_modules(flat)
  return [m for m in mods if all(p in ok for p, _ in unit_members(flat, m))]


def _unit_view(x, axis: int):
  """A stacked kernel [L, ...] as [L, U, rest] with the unit axis second."""
  x = jnp.moveaxis(x, axis, 1)
  return x.reshape(x.shape[:2] + (-1,))


def aggregate_units(tree, modules: Iterable[str], how: str) -> dict[str, jax.Array]:
  """{module: [L, U]}: per unit, 'l1' (sum |x|), 'l2' (sqrt sum x^2) or 'sum' of its weights."""
  flat = traverse_util.flatten_dict(tree, sep='/')
  out = {}
  for mod in modules:
    total = 0.0
    for path, axis in unit_members(flat, mod):
      v = _unit_view(flat[path].astype(jnp.float32), axis)
      total = total + {'l1': lambda: jnp.abs(v).sum(-1), 'l2': lambda: jnp.square(v).sum(-1),
                       'sum': lambda: v.sum(-1)}[how]()
    out[mod] = jnp.sqrt(total) if how == 'l2' else total
  return out


def unit_scores(params, cfg: PruneConfig = PruneConfig()) -> dict[str, jax.Array]:
  """Structured L1 / L2 norm of each head and FFN neuron: {module: [L, U]}."""
  return aggregate_units(params, unit_modules(params, cfg), cfg.norm)


def gradient_scores(params, loss_fn: Callable, batches: Iterable, cfg: PruneConfig,
                    grad_fn: Callable | None = None):
  """Gradient-based scores over calibration batches.

  'taylor': sum over batches of |w * g_b| (first-order Taylor estimate of the loss change when a
  weight is zeroed); per unit, |sum of w * g_b over the unit| (the change when the whole unit is).
  'snip': |w * mean_b g_b| (connection sensitivity). Unstructured: {path: scores}; with
  `cfg.structured_gradients`: {module: [L, U]}.
  """
  if cfg.method not in ('taylor', 'snip'):
    raise ConfigError(f"gradient_scores needs prune.method 'taylor' or 'snip', got {cfg.method!r}")
  names = prunable(params, cfg)
  modules = unit_modules(params, cfg) if cfg.structured_gradients else None
  grad_fn = grad_fn or jax.jit(jax.grad(loss_fn))

  @jax.jit
  def taylor(params, g):
    wg = jax.tree.map(lambda w, g: w.astype(jnp.float32) * g.astype(jnp.float32), params, g)
    if modules is not None:
      return {k: jnp.abs(v) for k, v in aggregate_units(wg, modules, 'sum').items()}
    flat = traverse_util.flatten_dict(wg, sep='/')
    return {k: jnp.abs(flat[k]) for k in names}

  acc, n = None, 0
  for batch in batches:
    g = grad_fn(params, batch)
    if cfg.method == 'taylor':
      s = taylor(params, g)
      acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    else:
      acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
    n += 1
  if n == 0:
    raise ValueError('gradient_scores: the calibration batches are empty')
  return acc if cfg.method == 'taylor' else taylor(params, jax.tree.map(lambda g: g / n, acc))


def model_loss_fn(model_cfg) -> Callable:
  """loss(params, batch) -> mean token cross-entropy (weights `decoder_loss_weights`), no dropout,
  for a batch dict of `t5like.data.pipeline` (T5X feature names)."""
  model = build_model(model_cfg)

  def loss(params, batch):
    logits = step_lib.apply_model(model, params, batch, deterministic=True)
    w = step_lib.loss_weights(batch)
    ce, _, _ = step_lib.cross_entropy_sums(logits, batch['decoder_target_tokens'], w)
    return ce / jnp.maximum(w.sum(), 1.0)

  return loss


# ----------------------------------------------------------------------------- masks

def unstructured_masks(params, scores: Mapping[str, jax.Array], fraction,
                       cfg: PruneConfig = PruneConfig(), prev_masks=None):
  """Masks that drop exactly round(fraction * n) weights: per parameter and stacked layer
  (scope 'layer') or over all scored parameters at once ('global'). Weights already masked in
  `prev_masks` score lowest, so masks only grow. `fraction` may be traced."""
  flat = traverse_util.flatten_dict(params, sep='/')
  prev = traverse_util.flatten_dict(prev_masks, sep='/') if prev_masks is not None else {}
  s = {}
  for k, v in scores.items():
    v = jnp.asarray(v, jnp.float32)
    s[k] = jnp.where(prev[k], v, -jnp.inf) if k in prev else v
  masks = {k: jnp.ones(v.shape, bool) for k, v in flat.items()}
  if cfg.scope == 'layer':
    for k, v in s.items():
      rows = _rows(k, v)
      masks[k] = prune_lowest(rows, _count(fraction, rows.shape[1])).reshape(v.shape)
  else:
    names = list(s)
    allv = jnp.concatenate([s[k].reshape(-1) for k in names])
    keep = prune_lowest(allv, _count(fraction, allv.size))
    off = 0
    for k in names:
      masks[k] = keep[off:off + s[k].size].reshape(s[k].shape)
      off += s[k].size
  return traverse_util.unflatten_dict(masks, sep='/')


def nm_input_axes(name: str, ndim: int) -> tuple[int, ...]:
  """Axes of a kernel that are contracted with the activation (the 'input dimension')."""
  lead = 1 if STACKED in '/' + name else 0
  if name.endswith('/out/kernel'):
    return (lead, lead + 1)                   # [L, N, H, D]: input is N*H
  if name.endswith('embedding'):
    return (ndim - 1,)                        # [V, D] used as the output layer: input D
  return (lead,)                              # [L, D, N, H], [L, D, F], [L, F, D], [D, V]


def nm_masks(params, scores: Mapping[str, jax.Array], nm: str, prev_masks=None):
  """N:M masks: in every group of M consecutive input-dimension weights (per output unit and
  layer) the N highest scores are kept. An error names a parameter whose input dimension M does not
  divide."""
  n, m = parse_nm(nm)
  flat = traverse_util.flatten_dict(params, sep='/')
  prev = traverse_util.flatten_dict(prev_masks, sep='/') if prev_masks is not None else {}
  masks = {k: jnp.ones(v.shape, bool) for k, v in flat.items()}
  for k, v in scores.items():
    v = jnp.asarray(v, jnp.float32)
    if k in prev:
      v = jnp.where(prev[k], v, -jnp.inf)
    axes = nm_input_axes(k, v.ndim)
    size = int(np.prod([v.shape[a] for a in axes]))
    if size % m:
      raise ValueError(f"N:M sparsity {nm}: the input dimension of parameter '{k}' (shape "
                       f'{v.shape}, input axes {axes}, size {size}) is not divisible by M={m}; '
                       'exclude it with prune.exclude or choose another M')
    rest = [a for a in range(v.ndim) if a not in axes]
    t = jnp.transpose(v, rest + list(axes))
    g = t.reshape(t.shape[:len(rest)] + (size // m, m))
    keep = prune_lowest(g, m - n).reshape(t.shape)
    masks[k] = jnp.transpose(keep, np.argsort(rest + list(axes)))
  return traverse_util.unflatten_dict(masks, sep='/')


def relpos_tied_modules(params, modules: Iterable[str]) -> list[str]:
  """Self-attention modules whose stack has a relative-position bias table (shared by its layers):
  their heads are tied across layers for a surgery that slices that table."""
  flat = traverse_util.flatten_dict(params, sep='/')
  out = []
  for mod in modules:
    stack = mod.split('/stack/')[0]
    if (mod.endswith('/attention') or mod.endswith('/self_attention')) and \
        f'{stack}/relpos_bias/rel_embedding' in flat:
      out.append(mod)
  return out


def structured_unit_masks(params, scores: Mapping[str, jax.Array], fraction,
                          cfg: PruneConfig = PruneConfig(), prev=None) -> dict[str, jax.Array]:
  """Unit masks {module: bool [L, U]} removing the lowest-scoring heads / neurons.

  scope 'layer': round(fraction * U) units in every layer of every module (so the pruned model
  has uniform shapes and surgery shrinks it fully); 'global': one ranking per kind (heads, neurons)
  over all modules, about `fraction` of the units. Tied self-attention heads (see
  `relpos_tied_modules`) are scored by their sum over layers and removed in every layer at once.
  `prev` (unit masks) marks units already removed; they stay removed. `fraction` may be traced.
  """
  tied = set(relpos_tied_modules(params, scores)) if cfg.tie_relpos_heads else set()
  flat = traverse_util.flatten_dict(params, sep='/')
  items = {}
  for mod, s in scores.items():
    s = jnp.asarray(s, jnp.float32)
    if prev is not None:
      s = jnp.where(prev[mod], s, -jnp.inf)
    if mod in tied:
      items[mod] = (s.sum(0, keepdims=True), s.shape[0])
    else:
      items[mod] = (s, 1)
  out = {}
  if cfg.scope == 'layer':
    for mod, (s, size) in items.items():
      keep = prune_lowest(s, _count(fraction, s.shape[1]))
      out[mod] = jnp.broadcast_to(keep, scores[mod].shape)
    return out
  for kind in ('heads', 'neurons'):
    mods = [m for m in items if (f'{m}/query/kernel' in flat) == (kind == 'heads')]
    if not mods:
      continue
    allv = jnp.concatenate([items[m][0].reshape(-1) for m in mods])
    sizes = jnp.concatenate([jnp.full(items[m][0].size, items[m][1], jnp.int32) for m in mods])
    total = sum(scores[m].size for m in mods)
    keep = prune_lowest(allv, _count(fraction, total), sizes)
    off = 0
    for m in mods:
      s = items[m][0]
      out[m] = jnp.broadcast_to(keep[off:off + s.size].reshape(s.shape), scores[m].shape)
      off += s.size
  return out


def expand_unit_masks(params, unit_masks: Mapping[str, jax.Array], base=None):
  """Parameter masks (tree) from unit masks: a removed head / neuron is zero in every kernel it
  spans. `base` (a mask tree) is intersected."""
  flat = traverse_util.flatten_dict(params, sep='/')
  if base is None:
    masks = {k: jnp.ones(v.shape, bool) for k, v in flat.items()}
  else:
    masks = dict(traverse_util.flatten_dict(base, sep='/'))
  for mod, um in unit_masks.items():
    for path, axis in unit_members(flat, mod):
      shape = [1] * flat[path].ndim
      shape[0], shape[axis] = um.shape
      masks[path] = masks[path] & jnp.broadcast_to(um.reshape(shape), flat[path].shape)
  return traverse_util.unflatten_dict(masks, sep='/')


def unit_masks_of(params, masks, modules: Iterable[str] | None = None) -> dict[str, jax.Array]:
  """Which units a parameter mask leaves present: {module: bool [L, U]} (jittable).

  A head is removed when its value or out slice is entirely masked; a neuron when its wo row or any
  wi column is (relu / gelu / silu of 0 is 0). Both are exact removals."""
  flat = traverse_util.flatten_dict(params, sep='/')
  mflat = traverse_util.flatten_dict(masks, sep='/')
  modules = list(attention_modules(flat)) + list(mlp_modules(flat)) if modules is None else modules
  out = {}
  for mod in modules:
    members = unit_members(flat, mod)
    if f'{mod}/query/kernel' in flat:
      members = [(p, a) for p, a in members if p.endswith(('/value/kernel', '/out/kernel'))]
    present = None
    for path, axis in members:
      here = _unit_view(jnp.asarray(mflat[path]), axis).any(-1)
      present = here if present is None else present & here
    out[mod] = present
  return out


def compute_masks(params, cfg: PruneConfig, *, loss_fn: Callable | None = None,
                  batches: Iterable | None = None, fraction=None, prev_masks=None):
  """One-shot masks of `cfg` at `fraction` (default `cfg.sparsity`). Gradient methods need
  `loss_fn(params, batch)` and calibration `batches` (a re-iterable sequence); 'greedy' masks
  come from `t5like.compress.greedy.greedy_masks`."""
  fraction = cfg.sparsity if fraction is None else fraction
  if cfg.method == 'greedy':
    raise ConfigError("prune.method='greedy' removes units one at a time by the loss: use "
                      't5like.compress.greedy.greedy_masks(params, loss_fn, batches, cfg)')
  if cfg.method in ('taylor', 'snip') and (loss_fn is None or batches is None):
    raise ValueError(f'prune.method={cfg.method!r} needs loss_fn and calibration batches')
  if cfg.method == 'structured' or (cfg.method in ('taylor', 'snip') and cfg.structured_gradients):
    if cfg.nm:
      raise ConfigError('prune.nm applies to unstructured scores, not structured ones')
    scores = unit_scores(params, cfg) if cfg.method == 'structured' else \
        gradient_scores(params, loss_fn, batches, cfg)
    prev = unit_masks_of(params, prev_masks, list(scores)) if prev_masks is not None else None
    return expand_unit_masks(params, structured_unit_masks(params, scores, fraction, cfg, prev),
                             base=prev_masks)
  scores = magnitude_scores(params, cfg) if cfg.method == 'magnitude' else \
      gradient_scores(params, loss_fn, batches, cfg)
  if cfg.nm:
    return nm_masks(params, scores, cfg.nm, prev_masks)
  return unstructured_masks(params, scores, fraction, cfg, prev_masks)
