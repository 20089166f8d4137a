"""Device meshes with axes ('data', 'fsdp', 'tensor', 'stage') and logical-axis rule presets.

Modules name their parameter and activation dimensions logically ('batch', 'embed', 'heads', ...);
these presets map those names onto mesh axes. Flax resolves the dimensions of one array by going
through the rules in order and giving a rule's mesh axes to its logical name only if no other
dimension of the same array already took them. 'batch' comes first in every preset, so an
activation's batch takes ('data', 'fsdp') and its 'embed' stays unsharded, while a parameter (which
has no batch dimension) gets 'embed' -> 'fsdp'.

The constraints only take effect under `activate(mesh, rules, mesh_cfg)`, which enters
`jax.set_mesh`. The legacy `with mesh:` does not set the abstract mesh that flax looks for, so
under it every `nn.with_logical_constraint` is silently a no-op (activations and logits come out
replicated); `tests/parallel/test_mesh.py` pins this.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from t5like.config import ConfigError, MeshConfig, ModelConfig
from t5like.parallel import pipeline

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


def _ici_dcn(cfg: MeshConfig) -> tuple[dict[str, int], dict[str, int]]:
  return ({a: getattr(cfg, a) for a in MESH_AXES}, {a: getattr(cfg, f'dcn_{a}') for a in MESH_AXES})


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Total axis sizes (ICI x DCN), at most one -1 filled so that they multiply to the devices."""
  ici, dcn = _ici_dcn(cfg)
  num_slices = math.prod(dcn.values())
  if num_devices % num_slices:
    raise ConfigError(f'mesh dcn_* sizes {dcn} multiply to {num_slices} slices, which does not '
                      f'divide the {num_devices} devices')
  per_slice = num_devices // num_slices
  unknown = [a for a, s in ici.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f'at most one mesh axis may be -1, got {unknown} (mesh {ici})')
  bad = [a for a, s in ici.items() if s == 0 or s < -1]
  if bad:
    raise ConfigError(f'mesh axis sizes must be positive or -1, got {[(a, ici[a]) for a in bad]}')
  known = math.prod(s for s in ici.values() if s != -1)
  where = f' per slice ({num_slices} slices)' if num_slices > 1 else ''
  if unknown:
    if per_slice % known:
      raise ConfigError(f'mesh {ici}: the fixed axes multiply to {known}, which does not divide '
                        f'the {per_slice} devices{where}; change mesh.{"/".join(ici)}')
    ici[unknown[0]] = per_slice // known
  elif known != per_slice:
    raise ConfigError(f'mesh {ici} has {known} devices but {per_slice} are available{where}; '
                      f'make the sizes multiply to {per_slice} or set one of them to -1')
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `cfg` over `devices` (default: all). DCN sizes > 1 build a hybrid (multi-slice)
  mesh with `mesh_utils.create_hybrid_device_mesh`; its granules are the slices (multi-slice
  TPU) or, where all devices are in one slice, the processes."""
  from jax.experimental import mesh_utils
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  ici, dcn = _ici_dcn(cfg)
  dcn_shape = tuple(dcn[a] for a in MESH_AXES)
  ici_shape = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
  if math.prod(dcn_shape) > 1:
    slices = {getattr(d, 'slice_index', 0) for d in devices}
    try:
      grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices,
                                                  process_is_granule=len(slices) == 1)
    except (ValueError, AssertionError) as e:
      raise ConfigError(f'mesh ici {ici_shape} x dcn {dcn_shape} (axes {MESH_AXES}) does not fit '
                        f'the {len(devices)} devices as slices/processes: {e}') from None
  else:
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
      grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Topologies mesh_utils has no physical layout for (CPU, some GPU counts): device order.
      grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def check_model_fits(model_cfg: ModelConfig, mesh_cfg: MeshConfig, mesh: Mesh,
                     global_batch: int | None = None) -> None:
  """Raises ConfigError naming the model dimension that its mesh axis does not divide."""
  rules = dict(get_rules(mesh_cfg.rules))
  sizes = dict(mesh.shape)
  dims = {'heads': ('model.num_heads', model_cfg.num_heads),
          'mlp': ('model.d_ff', model_cfg.d_ff),
          'embed': ('model.d_model', model_cfg.d_model),
          'vocab': ('model.vocab_size', model_cfg.vocab_size)}
  for logical, (field, n) in dims.items():
    axes = rules.get(logical)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    k = math.prod(sizes[a] for a in axes)
    if n % k:
      raise ConfigError(f'{field}={n} is not divisible by mesh axis {"x".join(axes)}={k} '
                        f'(rules {mesh_cfg.rules!r} map {logical!r} to it); change the mesh or '
                        f'the preset')
  stages = sizes['stage']
  uses_stage = rules.get('layers') == 'stage'
  if stages > 1 and not uses_stage:
    raise ConfigError(f'mesh.stage={stages} but rules {mesh_cfg.rules!r} do not map '
                      f"'layers' to 'stage'; use a pipeline preset such as 'pp_{mesh_cfg.rules}'")
  if stages > 1:
    chunks = stages * mesh_cfg.pipeline_repeats
    stacks = [('num_encoder_layers', model_cfg.num_encoder_layers)] if model_cfg.is_encdec else []
    for field, n in stacks + [('num_decoder_layers', model_cfg.num_decoder_layers)]:
      groups = model_cfg.shared_layer_groups or n
      if groups % chunks:
        raise ConfigError(f'model.{field}={n} ({groups} weight groups) is not divisible by '
                          f'mesh.stage x mesh.pipeline_repeats = {stages} x '
                          f'{mesh_cfg.pipeline_repeats} = {chunks}')
  if global_batch is not None:
    shards = sizes['data'] * sizes['fsdp']
    micro = num_microbatches(mesh_cfg, stages) if stages > 1 else 1
    if global_batch % (shards * micro):
      raise ConfigError(f'global batch {global_batch} is not divisible by data x fsdp = {shards} '
                        f'times {micro} pipeline microbatches; make data.batch_size a multiple of '
                        f'{shards * micro}')


def num_microbatches(mesh_cfg: MeshConfig, stages: int) -> int:
  return mesh_cfg.num_microbatches or 2 * stages


@contextlib.contextmanager
def activate(mesh: Mesh, rules, mesh_cfg: MeshConfig | None = None):
  """Where to trace and run sharded code: the mesh (jax.set_mesh), the logical-axis rules, and,
  when the mesh has stages, the pipeline schedule of `mesh_cfg` (microbatches, repeats)."""
  if isinstance(rules, str):
    rules = get_rules(rules)
  stages = dict(mesh.shape).get('stage', 1)
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    if stages > 1:
      if mesh_cfg is None:
        raise ConfigError(f'the mesh has stage={stages}: pass its MeshConfig to activate() for '
                          'the pipeline schedule (num_microbatches, pipeline_repeats)')
      stack.enter_context(pipeline.schedule(pipeline.Schedule(
          stages, num_microbatches(mesh_cfg, stages), mesh_cfg.pipeline_repeats)))
    yield mesh
