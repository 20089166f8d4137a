"""Decoding benchmark: greedy t5_small (random f32 weights), 128 input tokens, exactly 64 new.

  python scripts/bench.py decode [--runs=5] [--compare_torch] [--out=results.json]

Prints one JSON object: new tokens/s at batch 1 and 8 (median of `runs` after a warm-up), compile
time, and the batch-1 memory-bandwidth use: decoder + output weight bytes read per token x tokens/s,
over the fastest rate at which a matrix-vector product streams a matrix of that size in the same
run (XLA's dot, or the CPU decoding kernel; the bound for batch-1 decoding here). The parameters
are put in the decode backend's layout once (`decode.prepare_params`, as a server does at load;
`prepare_s`: per-layer weights, packed for the CPU kernel when `cpu_kernel`; `decode_backend`
says which backend 'auto' chose, t5like/infer/backend.py); `b1_unprepared_new_tokens_per_s` is
batch 1 from the training layout (XLA's dots). `load_avg` is the host's 1-minute load average
before and after the run (other work on the machine).
`--compare_torch` also times transformers' PyTorch T5 on the same config in the same run, its
calls alternating with ours, so the ratios come from one run and one state of the host.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5like.config import get_variant
from t5like.infer import backend as backend_lib, decode
from t5like.kernels import cpu_matmul
from t5like.models import init_params


def add_args(parser):
  parser.add_argument('--variant', default='t5_small')
  parser.add_argument('--input_len', type=int, default=128)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--compare_torch', action='store_true')
  parser.add_argument('--out', default='', help='also write the JSON record to this file')


def measure_stream_bandwidth(nbytes: int, runs: int = 10) -> dict:
  """Bytes/s at which a jitted f32 matrix-vector product streams an `nbytes` matrix (best of
  `runs`): XLA's dot, and the CPU decoding kernel on the packed matrix where it is built."""
  cols = 512
  rows = nbytes // 4 // cols // cpu_matmul.PANEL * cpu_matmul.PANEL
  w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
  x = jnp.ones((1, cols), jnp.float32)
  candidates = {'xla': (jax.jit(lambda x, w: jnp.einsum('bd,vd->bv', x, w)), w)}
  if cpu_matmul.available():
    candidates['kernel'] = (jax.jit(cpu_matmul.matmul), cpu_matmul.pack(w, transposed=True))
  rates = {}
  for name, (f, weight) in candidates.items():
    f(x, weight).block_until_ready()
    times = []
    for _ in range(runs):
      t = time.perf_counter()
      f(x, weight).block_until_ready()
      times.append(time.perf_counter() - t)
    rates[name] = w.nbytes / min(times)
  return rates


def decoder_weight_bytes(params) -> int:
  """Weight bytes read per generated token: the decoder stack (less the cross-attention key and
  value projections, applied once to the encoder output), final norm, output layer."""
  flat = jax.tree_util.tree_flatten_with_path(params['decoder'])[0]
  once = lambda path: 'cross_attention' in path and ("'key'" in path or "'value'" in path)
  dec = sum(x.nbytes for p, x in flat if not once(jax.tree_util.keystr(p)))
  out = params['shared_embedding']['embedding'].nbytes if 'lm_head' not in params['decoder'] else 0
  return dec + out


def jax_runner(params, cfg, batch, input_len, new_tokens):
  """(one timed greedy call, compile seconds), compiled and warmed up."""
  rng = np.random.default_rng(batch)
  enc = jnp.asarray(rng.integers(2, cfg.vocab_size, (batch, input_len)), jnp.int32)
  t = time.perf_counter()
  compiled = decode.greedy.lower(params, cfg, enc, new_tokens, stop_at_eos=False).compile()
  compile_s = time.perf_counter() - t
  out = compiled(params, enc)
  out.tokens.block_until_ready()
  assert int(out.lengths.min()) == new_tokens, 'benchmark must generate exactly new_tokens'
  return lambda: compiled(params, enc).tokens.block_until_ready(), compile_s


def torch_runner(variant_cfg, batch, input_len, new_tokens, transform=None):
  """One timed `generate` call of transformers' PyTorch T5 on the same config, warmed up
  (`transform(model) -> model` first, e.g. torch's dynamic int8 quantisation)."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(
      vocab_size=variant_cfg.vocab_size, d_model=variant_cfg.d_model, d_kv=variant_cfg.head_dim,
      d_ff=variant_cfg.d_ff, num_layers=variant_cfg.num_encoder_layers,
      num_decoder_layers=variant_cfg.num_decoder_layers, num_heads=variant_cfg.num_heads,
      feed_forward_proj=variant_cfg.ffn_activation,
      tie_word_embeddings=variant_cfg.tie_embeddings, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  if transform is not None:
    model = transform(model)
  enc = torch.randint(2, variant_cfg.vocab_size, (batch, input_len))
  kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)

  def call():
    with torch.no_grad():
      model.generate(enc, **kw)
  call()
  return call


def median_rates(runners: dict, tokens: int, runs: int) -> dict:
  """New tokens/s of each runner: median of `runs` calls, the runners' calls alternating, so
  that a change in the host's speed during the run falls on all of them alike."""
  times = {name: [] for name in runners}
  for _ in range(runs):
    for name, call in runners.items():
      t = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - t)
  return {name: tokens / statistics.median(ts) for name, ts in times.items()}


def run(args) -> dict:
  cfg = get_variant(args.variant)
  params = init_params(cfg, jax.random.key(0))
  result = {'benchmark': 'decode', 'variant': args.variant, 'input_len': args.input_len,
            'new_tokens': args.new_tokens, 'runs': args.runs, 'backend': jax.default_backend(),
            'decode_backend': backend_lib.get_backend('auto', cfg).name, 'compile_s': {},
            'load_avg': [round(os.getloadavg()[0], 2)]}
  t = time.perf_counter()
  prepared = jax.block_until_ready(decode.prepare_params(cfg, params))
  result['prepare_s'] = round(time.perf_counter() - t, 3)
  result['cpu_kernel'] = cpu_matmul.available()
  batches = [int(x) for x in args.batches.split(',')]
  for b in batches:
    runners = {}
    runners['jax'], compile_s = jax_runner(prepared, cfg, b, args.input_len, args.new_tokens)
    result['compile_s'][f'b{b}'] = round(compile_s, 2)
    if b == 1:
      runners['unprepared'], _ = jax_runner(params, cfg, 1, args.input_len, args.new_tokens)
    if args.compare_torch:
      runners['torch'] = torch_runner(cfg, b, args.input_len, args.new_tokens)
    rates = median_rates(runners, b * args.new_tokens, args.runs)
    result[f'b{b}_new_tokens_per_s'] = round(rates['jax'], 2)
    if 'unprepared' in rates:
      result['b1_unprepared_new_tokens_per_s'] = round(rates['unprepared'], 2)
    if 'torch' in rates:
      result[f'torch_b{b}_new_tokens_per_s'] = round(rates['torch'], 2)
      result[f'speedup_b{b}'] = round(rates['jax'] / rates['torch'], 2)
  weight_bytes = decoder_weight_bytes(params)
  rates = measure_stream_bandwidth(weight_bytes)
  bandwidth = max(rates.values())
  result['weight_bytes_per_token'] = weight_bytes
  result['measured_bandwidth_bytes_per_s'] = round(bandwidth)
  result['xla_gemv_bytes_per_s'] = round(rates['xla'])
  result['bandwidth_bound_b1_tokens_per_s'] = round(bandwidth / weight_bytes, 2)
  if 'b1_new_tokens_per_s' in result:
    result['b1_bandwidth_use'] = round(result['b1_new_tokens_per_s'] * weight_bytes / bandwidth, 3)
  result['load_avg'].append(round(os.getloadavg()[0], 2))
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_args(parser)
  args = parser.parse_args(argv)
  record = run(args)
  print(json.dumps(record))
  if args.out:
    with open(args.out, 'w') as f:
      f.write(json.dumps(record, indent=1, sort_keys=True) + '\n')


if __name__ == '__main__':
  main()
