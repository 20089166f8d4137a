"""Shardings from logical axis names, and initialisation that never materialises on one host.

`sharded_init(fn, mesh, rules, *args)`: `jax.eval_shape(fn)` gives the boxed (logically
partitioned) output tree, whose names the rules turn into NamedShardings; `fn` is then jitted with
those `out_shardings`, so each device only ever allocates its own shard.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedSharding for every leaf of a tree holding nn.Partitioned boxes (others replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def sharded_init(fn: Callable, mesh: Mesh, rules, *args):
  """(unboxed output of fn(*args) placed by its logical names, its shardings)."""
  abstract = jax.eval_shape(fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  unboxed_fn = lambda *a: nn.unbox(fn(*a))
  with mesh, nn.logical_axis_rules(rules):
    out = jax.jit(unboxed_fn, out_shardings=shardings)(*args)
  return out, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """The global batch splits its leading axis over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_device_bytes(tree) -> int:
  """Bytes that one device (the first) holds of a tree of sharded arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.addressable_shards[0]
    total += shard.data.size * shard.data.dtype.itemsize
  return total
