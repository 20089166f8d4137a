"""Benchmarks with JSON output (never timed tests).

  python scripts/bench.py train [--variant=t5_small --batch=8 --inputs=128 --targets=128
                                 --steps=5 --precision=f32|bf16 --out=FILE --compare_torch]

  python scripts/bench.py decode [--compare_torch]   # scripts/bench_decode.py
  python scripts/bench.py attention                  # scripts/bench_attention.py
  python scripts/bench.py quant [--out=FILE]         # scripts/bench_quant.py
  python scripts/bench.py prune                      # scripts/bench_prune.py
  python scripts/bench.py engine                     # scripts/bench_engine.py

`train`: one JSON object with the median step time, tokens/s (inputs + targets), the exact matmul
FLOPs of a step (t5like.models.flops), the f32 matmul peak measured in the same run, and the MFU;
on a known accelerator also the MFU against the chip's published peak at the compute dtype
(t5like.parallel.hardware: TPU v4 / v5e / v5p / v6e, A100, H100, H200);
with --compare_torch also the same figures for transformers' PyTorch T5 with torch.optim.AdamW on
the same config and machine, and the speed ratio.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

# Sibling scripts: the script's own folder is on sys.path when run as `python scripts/bench.py`.
import bench_attention
import bench_decode
import bench_engine
import bench_onnx
import bench_prune
import bench_quant
import benchlib
from t5like.config import MeshConfig, OptimConfig, get_variant
from t5like.models import build_model, flops
from t5like.optim import make_optimizer
from t5like.parallel import hardware
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.precision import get_policy
from t5like.train import metrics, state as state_lib, step as step_lib


def _synthetic_batch(B, S, T, V, seed=0):
  rng = np.random.default_rng(seed)
  return dict(encoder_input_tokens=rng.integers(2, V, (B, S)).astype(np.int32),
              decoder_input_tokens=rng.integers(2, V, (B, T)).astype(np.int32),
              decoder_target_tokens=rng.integers(2, V, (B, T)).astype(np.int32),
              decoder_loss_weights=np.ones((B, T), np.float32))


def bench_train(args) -> dict:
  cfg = get_variant(args.variant, precision=args.precision, dropout_rate=0.0, remat_policy='none')
  B, S, T = args.batch, args.inputs, args.targets
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  rules = get_rules('dp')
  tx = make_optimizer(OptimConfig(name='adamw', warmup_steps=0, schedule='constant',
                                  clip_grad_norm=0.0), None, 1000)
  state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, 0)
  batch = _synthetic_batch(B, S, T, cfg.vocab_size)
  with step_lib.mesh_context(mesh, rules):
    fn = step_lib.jit_train_step(model=build_model(cfg), tx=tx, state_shardings=shardings,
                                 batch_shardings=step_lib.batch_shardings(mesh, batch), mesh=mesh)
    batch = jax.device_put(batch, step_lib.batch_shardings(mesh, batch))
    holder = [state]

    def one():
      holder[0], m = fn(holder[0], batch)
      jax.block_until_ready(m)

    times = benchlib.time_calls(one, warmup=2, repeats=args.steps)
  peak = metrics.measure_peak_flops()
  step_s = benchlib.median(times)
  model_flops = flops.train_step_flops(cfg, B, S, T)
  kind = jax.devices()[0].device_kind   # one device runs the step
  spec = hardware.lookup(kind)
  compute_dtype = get_policy(args.precision).compute_dtype.dtype.name
  out = {'bench': 'train', 'variant': args.variant, 'batch': B, 'inputs': S, 'targets': T,
         'dtype': compute_dtype, 'precision': args.precision, 'optimizer': 'adamw', 'step_s': step_s, 'step_s_all': times,
         'tokens_per_s': B * (S + T) / step_s, 'model_flops_per_step': model_flops,
         'peak_flops_per_s': peak, 'mfu': model_flops / step_s / peak,
         'devices': jax.device_count(), 'backend': jax.default_backend(),
         'device_kind': kind, 'published_chip': spec.name if spec else None,
         'published_peak_flops_per_s': spec.peak_flops(compute_dtype) if spec else None,
         'mfu_vs_published_peak': hardware.published_mfu(model_flops / step_s, kind,
                                                          compute_dtype)}
  if args.compare_torch:
    t_step = _torch_step_s(cfg, B, S, T, args.steps)
    out.update(torch_step_s=t_step, torch_tokens_per_s=B * (S + T) / t_step,
               speedup_vs_torch=t_step / step_s)
  return out


def _torch_step_s(cfg, B, S, T, steps) -> float:
  import torch  # optional (parity extra): only for --compare_torch
  from transformers import T5Config, T5ForConditionalGeneration
  tc = T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
                num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
                num_heads=cfg.num_heads, dropout_rate=0.0, feed_forward_proj=cfg.ffn_activation,
                tie_word_embeddings=cfg.tie_embeddings)
  torch.manual_seed(0)
  model = T5ForConditionalGeneration(tc).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  b = _synthetic_batch(B, S, T, cfg.vocab_size)
  inp = torch.from_numpy(b['encoder_input_tokens']).long()
  dec = torch.from_numpy(b['decoder_input_tokens']).long()
  lab = torch.from_numpy(b['decoder_target_tokens']).long()

  def one():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=inp, decoder_input_ids=dec, labels=lab).loss
    loss.backward()
    opt.step()

  return benchlib.median(benchlib.time_calls(one, warmup=2, repeats=steps))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('train', help='t5_small training step throughput and MFU')
  p.add_argument('--variant', default='t5_small')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--inputs', type=int, default=128)
  p.add_argument('--targets', type=int, default=128)
  p.add_argument('--steps', type=int, default=5, help='timed steps (after 2 warm-up steps)')
  p.add_argument('--precision', default='f32', help='a policy of t5like.precision (f32, bf16)')
  p.add_argument('--out', default='', help='also write the JSON record to this file')
  p.add_argument('--compare_torch', action='store_true',
                 help="also time transformers' PyTorch T5 on the same config")
  p.set_defaults(fn=bench_train)
  p = sub.add_parser('decode', help='greedy decoding new tokens/s at batch 1 and 8')
  bench_decode.add_args(p)
  bench_onnx.add_args(p)
  p.set_defaults(fn=lambda a: (bench_onnx.run if a.compare_onnxruntime else bench_decode.run)(a))
  p = sub.add_parser('attention', help='CPU attention kernels against XLA (prefill, step)')
  bench_attention.add_args(p)
  p.set_defaults(fn=bench_attention.run)
  p = sub.add_parser('prune', help='forward / decode speed of surgically pruned models')
  bench_prune.add_args(p)
  p.set_defaults(fn=bench_prune.run)
  p = sub.add_parser('quant', help="int8 / int4 decoding against f32 and torch's dynamic int8")
  bench_quant.add_args(p)
  p.set_defaults(fn=bench_quant.run)
  p = sub.add_parser('engine', help='serving engine tokens/s by decode steps and overlap')
  bench_engine.add_args(p)
  p.set_defaults(fn=bench_engine.run)
  args = parser.parse_args(argv)
  record = args.fn(args)
  benchlib.emit(record)
  if getattr(args, 'out', ''):   # subcommands with --out also keep the record in a file
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(json.dumps(record, indent=1, sort_keys=True) + '\n')


if __name__ == '__main__':
  main()
