"""Device meshes with axes ('data', 'fsdp', 'tensor', 'stage') and logical-axis rule presets.

Modules name their parameter and activation dimensions logically ('batch', 'embed', 'heads', ...);
these presets map those names onto mesh axes. Flax resolves a logical name with the first rule
whose mesh axis is not yet used by the same array, so a parameter's 'embed' can go to 'fsdp' while
an activation whose batch already took 'fsdp' keeps 'embed' unsharded.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from t5like.config import ConfigError, MeshConfig

MESH_AXES = ('data', 'fsdp', 'tensor', 'stage')

_BATCH = ('batch', ('data', 'fsdp'))
_COMMON = (('length', None), ('kv', None), ('relpos_buckets', None))

RULES: dict[str, tuple] = {
    # Pure data parallelism: parameters replicated, batch split over every device.
    'dp': (_BATCH, ('layers', None), ('embed', None), ('mlp', None), ('heads', None),
           ('vocab', None)) + _COMMON,
    # ZeRO-3 style: parameters split along 'embed' over fsdp, gathered per layer.
    'fsdp': (_BATCH, ('layers', None), ('embed', 'fsdp'), ('mlp', None), ('heads', None),
             ('vocab', None)) + _COMMON,
    # Megatron tensor parallelism: heads, FFN hidden and vocab split over 'tensor'.
    'tp': (_BATCH, ('layers', None), ('embed', None), ('mlp', 'tensor'), ('heads', 'tensor'),
           ('vocab', 'tensor')) + _COMMON,
    'fsdp_tp': (_BATCH, ('layers', None), ('embed', 'fsdp'), ('mlp', 'tensor'),
                ('heads', 'tensor'), ('vocab', 'tensor')) + _COMMON,
}
# Pipeline variants: the stacked 'layers' axis is split into stages.
for _name in list(RULES):
  RULES[f'pp_{_name}'] = tuple(('layers', 'stage') if r[0] == 'layers' else r for r in RULES[_name])


def get_rules(name: str) -> tuple:
  if name not in RULES:
    raise ConfigError(f'unknown mesh.rules preset {name!r}; choose one of {sorted(RULES)}')
  return RULES[name]


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with at most one -1 filled in so that their product is `num_devices`."""
  sizes = {a: getattr(cfg, a) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f'at most one mesh axis may be -1, got {unknown}')
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f'mesh axis sizes must be positive or -1, got {[(a, sizes[a]) for a in bad]}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f'mesh {sizes}: the fixed axes multiply to {known}, which does not divide '
                        f'the {num_devices} devices')
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f'mesh {sizes} has {known} devices but {num_devices} are available')
  return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)
