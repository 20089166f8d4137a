#!/usr/bin/env python
"""Lowers and compiles the train step for a topology we may not have; prints JSON.

  python scripts/aot_compile.py --variant=t5_1_1_xxl --mesh=fsdp=32,tensor=8,rules=fsdp_tp \
      --devices=256

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

import argparse
import json
import math
import os
import sys
import time

GiB = 1 << 30


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--variant', required=True, help='a row of t5like.config.VARIANTS')
  p.add_argument('--mesh', default='',
                 help="MeshConfig fields, e.g. 'fsdp=32,tensor=8,rules=fsdp_tp'")
  p.add_argument('--devices', type=int, default=8, help='fake devices (--target=fake)')
  p.add_argument('--target', choices=('fake', 'real'), default='fake')
  p.add_argument('--batch_size', type=int, default=128, help='global batch')
  p.add_argument('--inputs_length', type=int, default=512)
  p.add_argument('--targets_length', type=int, default=114)
  p.add_argument('--precision', default='bf16', help='a policy of t5like.precision.POLICIES')
  p.add_argument('--remat_policy', default='full', help='see t5like.models.layers.REMAT_POLICIES')
  p.add_argument('--optimizer', default='adafactor', help='an optim.name')
  return p.parse_args(argv)


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


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
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

  model_cfg = config_lib.get_variant(args.variant, precision=args.precision,
                                     remat_policy=args.remat_policy)
  mesh_cfg = config_lib.from_dict(config_lib.MeshConfig, parse_mesh(args.mesh), prefix='mesh')
  mesh = mesh_lib.make_mesh(mesh_cfg)
  rules = mesh_lib.get_rules(mesh_cfg.rules)
  mesh_lib.check_model_fits(model_cfg, mesh_cfg, mesh, args.batch_size)
  model = transformer.build_model(model_cfg)
  tx = optimizers.make_optimizer(config_lib.OptimConfig(name=args.optimizer), None,
                                 total_steps=1000)

  abstract_state, state_shardings = state_lib.abstract_train_state(model_cfg, tx, mesh, rules)
  B, S, T = args.batch_size, args.inputs_length, args.targets_length
  shapes = {'decoder_input_tokens': (B, T), 'decoder_target_tokens': (B, T)}
  if model_cfg.is_encdec:
    shapes['encoder_input_tokens'] = (B, S)
  batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=partition.batch_sharding(mesh, 2))
           for k, v in shapes.items()}
  batch['decoder_loss_weights'] = jax.ShapeDtypeStruct(
      (B, T), jnp.float32, sharding=partition.batch_sharding(mesh, 2))
  step = step_lib.jit_train_step(model=model, tx=tx, state_shardings=state_shardings,
                                 batch_shardings={k: v.sharding for k, v in batch.items()},
                                 mesh=mesh)
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
      'variant': args.variant, 'target': args.target, 'devices': n,
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
  return report


if __name__ == '__main__':
  main()
