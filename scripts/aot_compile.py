#!/usr/bin/env python
"""Lowers and compiles the train step for a topology we may not have; prints JSON.

  python scripts/aot_compile.py --config=experiments/configs/shakespeare.py:small \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --devices=64 --device_kind='TPU v5e'
  python scripts/aot_compile.py --variant=t5_1_1_xxl --mesh=fsdp=32,tensor=8,rules=fsdp_tp \
      --devices=256

--config takes the experiment config and the same --config.a.b=value overrides as
experiments/main.py, so the check compiles the step that run will train: its model (vocabulary as
the tokenizer will size it: data.vocab_size + 100 sentinels, rounded up to 128), batch and
sequence lengths, optimizer and schedule, mesh, precision, remat policy, label smoothing, z-loss
and gradient accumulation. --variant builds the step from a VARIANTS row and the flags below
instead. --device_kind (or, with --target=real, the device present) names the chip whose memory
the per-device peak is compared with (t5like.parallel.hardware: TPU v4 / v5e / v5p / v6e, A100,
H100, H200); a real device's own `memory_stats()` limit is used when it reports one.

With the default --target=fake, N fake CPU devices stand in for the accelerators
(--xla_force_host_platform_device_count, set before jax is imported); nothing is allocated: the
train state comes from `jax.eval_shape` and the batch is `jax.ShapeDtypeStruct`s carrying their
shardings. The report: per-device memory from `compiled.memory_analysis()` (arguments, outputs,
temporaries; peak = arguments + outputs - aliased + temporaries), per-device and total FLOPs of one
step from `cost_analysis()`, parameter bytes per device, lowering and compile seconds, and whether
the peak fits 16 GiB and 32 GiB. XLA:CPU's buffer assignment differs from XLA:TPU's, so the memory
figures are an estimate of the TPU ones. With --target=real the script compiles for the devices
present (on a TPU VM: the real topology).

--mesh takes MeshConfig fields as key=value pairs (data, fsdp, tensor, stage, dcn_*, rules,
num_microbatches, pipeline_repeats); unset sizes keep their defaults (data=-1 fills the rest).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags


GiB = 1 << 30

_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg], as for '
                                          'experiments/main.py', lock_config=True)
flags.DEFINE_string('variant', None, 'a row of t5like.config.VARIANTS (instead of --config)')
flags.DEFINE_string('mesh', '', "--variant: MeshConfig fields, e.g. 'fsdp=32,tensor=8,rules=fsdp_tp'")
flags.DEFINE_integer('devices', 8, 'fake devices (--target=fake)')
flags.DEFINE_enum('target', 'fake', ['fake', 'real'], 'fake CPU devices, or the devices present')
flags.DEFINE_string('device_kind', '', "chip to compare memory with, e.g. 'TPU v5e' (default: the "
                    'device present with --target=real)')
flags.DEFINE_integer('batch_size', 128, '--variant: global batch')
flags.DEFINE_integer('inputs_length', 512, '--variant: encoder length')
flags.DEFINE_integer('targets_length', 114, '--variant: decoder length')
flags.DEFINE_string('precision', 'bf16', '--variant: a policy of t5like.precision.POLICIES')
flags.DEFINE_string('remat_policy', 'full', '--variant: see t5like.models.layers.REMAT_POLICIES')
flags.DEFINE_string('optimizer', 'adafactor', '--variant: an optim.name')
flags.DEFINE_string('out', '', 'also write the JSON report to this file')


def parse_mesh(text: str) -> dict:
  values = {}
  for item in filter(None, (s.strip() for s in text.split(','))):
    if '=' not in item:
      raise SystemExit(f'--mesh: {item!r} is not key=value (e.g. fsdp=32,tensor=8,rules=fsdp_tp)')
    key, value = item.split('=', 1)
    values[key.strip()] = value.strip() if key.strip() == 'rules' else int(value)
  return values


def _six_nd(model_cfg, params, B, S, T) -> float:
  import jax
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  dec = count(params['decoder']) + (model_cfg.vocab_size * model_cfg.d_model
                                    if model_cfg.tie_embeddings else 0)
  enc = count(params['encoder']) if model_cfg.is_encdec else 0
  return 6.0 * (enc * B * S + dec * B * T)


class _Args:
  """The flag values main() reads (a namespace, so tests can pass their own)."""

  def __init__(self, **kw):
    self.__dict__.update(kw)


def _args_from_flags() -> _Args:
  f = flags.FLAGS
  names = ('variant', 'mesh', 'devices', 'target', 'device_kind', 'batch_size', 'inputs_length',
           'targets_length', 'precision', 'remat_policy', 'optimizer', 'out')
  args = _Args(**{n: f[n].value for n in names})
  args.config = _CONFIG.value.to_dict() if _CONFIG.value is not None else None
  if (args.config is None) == (args.variant is None):
    raise app.UsageError('give exactly one of --config (an experiment) or --variant (a VARIANTS row)')
  return args


def _step_from_config(config_lib, cfg_dict):
  """(model cfg, mesh cfg, tx, B, S, T, batch keys, jit_train_step kwargs) of an experiment."""
  from t5like.data import pipeline, tokenizer
  from t5like.optim import make_optimizer, make_schedule
  cfg = config_lib.from_dict(config_lib.TrainConfig, cfg_dict)
  model_cfg = cfg.model
  if cfg.vocab_from_tokenizer:   # what the trained tokenizer will give (loop.resolve_config)
    m = tokenizer.MODEL_VOCAB_MULTIPLE
    vocab = -(-(cfg.data.vocab_size + tokenizer.NUM_EXTRA_IDS) // m) * m
    model_cfg = model_cfg.replace(vocab_size=vocab)
  lengths = pipeline.sequence_lengths(cfg.data, model_cfg.arch)
  S, T = lengths.get('encoder', 0), lengths['decoder']
  keys = {'decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids',
          'decoder_positions', 'decoder_loss_weights'}
  if model_cfg.is_encdec:
    keys |= {'encoder_input_tokens', 'encoder_segment_ids', 'encoder_positions'}
  tx = make_optimizer(cfg.optim, None, cfg.num_steps)
  kwargs = dict(schedule=make_schedule(cfg.optim, cfg.num_steps),
                label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                grad_accum_steps=cfg.grad_accum_steps)
  return model_cfg, cfg.mesh, tx, cfg.data.batch_size, S, T, sorted(keys), kwargs


def device_memory(jax, device_kind: str, target: str) -> dict | None:
  """{'kind', 'bytes', 'source'} of the chip the peak is compared with, or None."""
  from t5like.parallel import hardware
  if target == 'real' and not device_kind:
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if stats and stats.get('bytes_limit'):
      return {'kind': device.device_kind, 'bytes': int(stats['bytes_limit']),
              'source': 'device.memory_stats()'}
    device_kind = device.device_kind
  if not device_kind:
    return None
  spec = hardware.require(device_kind)
  return {'kind': spec.name, 'bytes': int(spec.memory_bytes), 'source': 'published'}


def main(args: _Args) -> dict:
  if args.target == 'fake':
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}').strip()
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  if args.target == 'fake' and jax.device_count() != args.devices:
    raise SystemExit(f'jax was imported before XLA_FLAGS could be set: {jax.device_count()} '
                     f'devices, not --devices={args.devices}; run this script as a fresh process')
  import jax.numpy as jnp
  from t5like import config as config_lib
  from t5like.optim import optimizers
  from t5like.parallel import mesh as mesh_lib, partition
  from t5like.train import state as state_lib, step as step_lib
  from t5like.models import transformer

  memory = device_memory(jax, args.device_kind, args.target)
  if args.config is not None:
    model_cfg, mesh_cfg, tx, B, S, T, keys, step_kwargs = _step_from_config(config_lib,
                                                                           args.config)
    args.precision, args.remat_policy = model_cfg.precision, model_cfg.remat_policy
    args.optimizer = args.config['optim']['name']
  else:
    model_cfg = config_lib.get_variant(args.variant, precision=args.precision,
                                       remat_policy=args.remat_policy)
    mesh_cfg = config_lib.from_dict(config_lib.MeshConfig, parse_mesh(args.mesh), prefix='mesh')
    tx = optimizers.make_optimizer(config_lib.OptimConfig(name=args.optimizer), None,
                                   total_steps=1000)
    B, S, T = args.batch_size, args.inputs_length, args.targets_length
    keys = ['decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights']
    keys += ['encoder_input_tokens'] if model_cfg.is_encdec else []
    step_kwargs = {}
  mesh = mesh_lib.make_mesh(mesh_cfg)
  rules = mesh_lib.get_rules(mesh_cfg.rules)
  mesh_lib.check_model_fits(model_cfg, mesh_cfg, mesh, B)
  model = transformer.build_model(model_cfg)

  abstract_state, state_shardings = state_lib.abstract_train_state(model_cfg, tx, mesh, rules)
  batch = {k: jax.ShapeDtypeStruct((B, S if k.startswith('encoder') else T),
                                   jnp.float32 if k.endswith('loss_weights') else jnp.int32,
                                   sharding=partition.batch_sharding(mesh, 2))
           for k in keys}
  step = step_lib.jit_train_step(model=model, tx=tx, state_shardings=state_shardings,
                                 batch_shardings={k: v.sharding for k, v in batch.items()},
                                 mesh=mesh, **step_kwargs)
  with mesh_lib.activate(mesh, rules, mesh_cfg):
    t0 = time.perf_counter()
    lowered = step.lower(abstract_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  n = mesh.devices.size
  params = abstract_state.params
  replicated = partition.find_replicated(params, min_bytes=1 << 20, warn=False)
  report = {
      'variant': args.variant or model_cfg.name, 'config': args.config is not None,
      'target': args.target, 'devices': n,
      'platform': jax.devices()[0].platform, 'mesh': dict(mesh.shape), 'rules': mesh_cfg.rules,
      'batch_size': B, 'inputs_length': S, 'targets_length': T, 'precision': args.precision,
      'remat_policy': args.remat_policy, 'optimizer': args.optimizer,
      'param_count': transformer.param_count(params),
      'param_bytes_per_device': partition.per_device_bytes(params),
      'state_bytes_per_device': partition.per_device_bytes(abstract_state),
      'memory_per_device': {'arguments': mem.argument_size_in_bytes,
                            'outputs': mem.output_size_in_bytes,
                            'aliased': mem.alias_size_in_bytes,
                            'temporaries': mem.temp_size_in_bytes,
                            'generated_code': mem.generated_code_size_in_bytes,
                            'peak': peak, 'peak_gib': round(peak / GiB, 3)},
      'fits_16gib': peak <= 16 * GiB, 'fits_32gib': peak <= 32 * GiB,
      'device_memory': memory,
      'fits_device': None if memory is None else peak <= memory['bytes'],
      'peak_fraction_of_device': None if memory is None else round(peak / memory['bytes'], 4),
      'flops_per_device': flops, 'flops_total': flops * n,
      # XLA's cost analysis counts a while-loop body once, and the layer stacks are nn.scan
      # loops: the figures above cover about one layer of each stack. 6 x (matmul parameters) x
      # tokens is the usual whole-step estimate (without attention scores or rematerialisation).
      'flops_6nd_estimate': _six_nd(model_cfg, params, B, S, T),
      'lower_seconds': round(t1 - t0, 2), 'compile_seconds': round(t2 - t1, 2),
      'replicated_params_over_1mib': [{'name': a, 'shape': s, 'bytes': b}
                                      for a, s, b in replicated],
  }
  if mesh.shape['stage'] > 1:
    from t5like.parallel import pipeline
    report['pipeline'] = pipeline.describe(pipeline.Schedule(
        mesh.shape['stage'], mesh_lib.num_microbatches(mesh_cfg, mesh.shape['stage']),
        mesh_cfg.pipeline_repeats))
  print(json.dumps(report, indent=1))
  if memory is not None:
    print(f"peak {peak / GiB:.2f} GiB per device of {memory['kind']}'s {memory['bytes'] / GiB:.1f} "
          f"GiB ({100 * peak / memory['bytes']:.1f}%): "
          f"{'fits' if peak <= memory['bytes'] else 'DOES NOT FIT'}", file=sys.stderr)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == '__main__':
  app.run(lambda argv: main(_args_from_flags()) and None)
