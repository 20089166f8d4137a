"""Shardings from logical axis names, and initialisation that never materialises on one host.

`sharded_init(fn, mesh, rules, *args)`: `jax.eval_shape(fn)` gives the boxed (logically
partitioned) output tree, whose names the rules turn into NamedShardings; `fn` is then jitted with
those `out_shardings`, so each device only ever allocates its own shard.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5like.config import ConfigError

BATCH_AXES = ('data', 'fsdp')

# Parameters at least this large that every device holds whole are reported by `find_replicated`.
REPLICATED_WARN_BYTES = 1 << 20


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedSharding for every leaf of a tree holding nn.Partitioned boxes (others replicated).

  Optimizer states derived from a boxed parameter by a shape-changing map keep the parameter's
  names (Adafactor's factored row / column statistics, its size-1 placeholders): a box whose names
  do not match its rank is replicated, and so is a dimension of size 1. Those leaves are small;
  `find_replicated` reports any that are not. Any other dimension that its mesh axes do not divide
  is a ConfigError naming the leaf.
  """
  sizes = dict(mesh.shape)

  def one(path, x):
    if not isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, P())
    shape = x.value.shape
    if len(x.names) != len(shape):
      return NamedSharding(mesh, P())
    spec = list(nn.logical_to_mesh_axes(x.names, rules))
    for i, (n, axes) in enumerate(zip(shape, spec)):
      axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      k = math.prod(sizes[a] for a in axes_t)
      if n % k and n == 1:
        spec[i] = None
      elif n % k:
        raise ConfigError(f'{_path_str(path)}: dimension {i} ({x.names[i]!r}, size {n}) is not '
                          f'divisible by mesh axis {"x".join(axes_t)}={k}; change the mesh sizes '
                          f'or the mesh.rules preset')
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(one, boxed_tree,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def sharded_init(fn: Callable, mesh: Mesh, rules, *args):
  """(unboxed output of fn(*args) placed by its logical names, its shardings)."""
  abstract = jax.eval_shape(fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  # Unboxed without the boxes' logical constraints: `out_shardings` places every leaf, and a box
  # copied from a parameter onto a reshaped optimizer statistic (Adafactor's factored rows and
  # columns) names more axes than the statistic has, which `with_logical_constraint` rejects.
  unboxed_fn = lambda *a: jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
      fn(*a), is_leaf=lambda x: isinstance(x, nn.Partitioned))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(unboxed_fn, out_shardings=shardings)(*args)
  return out, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """The global batch splits its leading axis over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_device_bytes(tree) -> int:
  """Bytes that one device (the first) holds of a tree of sharded arrays (or of ShapeDtypeStructs
  with shardings)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard_shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shard_shape) * x.dtype.itemsize
  return total


def total_bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def find_replicated(tree, shardings=None, min_bytes: int = REPLICATED_WARN_BYTES,
                    warn: bool = True) -> list[tuple[str, tuple[int, ...], int]]:
  """Leaves of at least `min_bytes` that every device holds whole while the mesh has more than one
  device: [(path, shape, bytes)], largest first; warns with their names when `warn`.

  `tree` holds arrays or ShapeDtypeStructs; `shardings` (same structure) overrides theirs.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  shard_leaves = (jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
                  if shardings is not None else [x.sharding for _, x in leaves])
  found = []
  for (path, x), sharding in zip(leaves, shard_leaves):
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    if (nbytes >= min_bytes and len(sharding.device_set) > 1
        and sharding.shard_shape(x.shape) == tuple(x.shape)):
      found.append((_path_str(path), tuple(x.shape), nbytes))
  found.sort(key=lambda f: -f[2])
  if found and warn:
    listing = ', '.join(f'{n} {s} ({b / 2**20:.1f} MiB)' for n, s, b in found[:10])
    warnings.warn(f'{len(found)} parameters of >= {min_bytes} bytes are fully replicated on every '
                  f'device: {listing}; check the mesh.rules preset maps one of their logical axes '
                  f'to a mesh axis', stacklevel=2)
  return found
