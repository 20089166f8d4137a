"""Decoding with ONNX Runtime beside t5like and transformers' PyTorch T5, in one run.

  python scripts/bench.py decode --compare_onnxruntime [--runs=5 --out=FILE]

Greedy t5_small (random f32 weights, `init_params` seed 0), 128 input tokens, exactly 64 new, at
batch 1 and 8. The same weights are exported (t5like.infer.onnx) and decoded by the numpy +
onnxruntime loop of t5like.ort, in f32 and after ONNX Runtime's dynamic int8 quantisation
(int8 weights per output channel, activations quantised per call); t5like decodes the prepared
params (decode.prepare_params) in f32 and after `compress.quantize.quantize_params(..., 'int8')`
(int8 weights per output channel, float activations; `t5like_int8_dyn`: also int8 activations
per token at run time, int8 x int8 matmuls, the closest to ONNX Runtime's scheme). PyTorch runs
`generate` on a T5 of the same config in f32. Every runner's calls alternate within each batch
size, so the ratios come from one run and one state of the host.

Also recorded: the f32 parity of the exported graphs at this size (ONNX Runtime's tokens against
t5like's, and the largest logit difference against t5like's teacher-forced forward) and the bytes
of the graphs and of t5like's parameters. Fresh random weights make every row repeat one token,
so token agreement is measured on a trained model instead (`--agreement_workdir`, default the
README's quick-start run `runs/shakespeare_default`, skipped with a note when it is absent): 32
held-out Shakespeare passages with one masked span each (its span-corruption task), up to 32 new
tokens, greedy; the fraction of rows whose outputs are identical and of equal tokens position by
position, for ONNX Runtime int8 against t5like int8 (weight-only and dynamic) and each against
its own f32.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_decode
from t5like import ort
from t5like.compress.quantize import quantize_params, weight_bytes
from t5like.config import get_variant
from t5like.infer import decode
from t5like.infer import onnx as t5onnx
from t5like.models import build_model, init_params


def ort_runner(model: ort.OrtModel, inputs, new_tokens: int):
  def call():
    tokens, lengths = model.greedy(inputs, new_tokens, stop_at_eos=False)
    assert int(lengths.min()) == new_tokens
    return tokens
  call()
  return call


def agreement(a, b) -> float:
  return round(float(np.mean(np.asarray(a) == np.asarray(b))), 4)


def inputs_for(cfg, batch: int, input_len: int):
  # The same draw as bench_decode.jax_runner, so every runner decodes the same sources.
  rng = np.random.default_rng(batch)
  return rng.integers(2, cfg.vocab_size, (batch, input_len))


def run(args) -> dict:
  folder = tempfile.mkdtemp(prefix='onnx_bench_')
  try:
    return _run(args, folder)
  finally:   # the exported graphs: hundreds of MB
    shutil.rmtree(folder, ignore_errors=True)


def _run(args, folder: str) -> dict:
  import onnxruntime
  cfg = get_variant(args.variant)
  params = jax.device_get(init_params(cfg, jax.random.key(0)))
  qparams, qcfg = jax.device_get(quantize_params(params, cfg, 'int8'))
  dparams, dcfg = jax.device_get(quantize_params(params, cfg, 'int8', activation_quant='dynamic'))
  result = {'benchmark': 'decode_onnxruntime', 'variant': args.variant,
            'input_len': args.input_len, 'new_tokens': args.new_tokens, 'runs': args.runs,
            'host': f'{platform.machine()}, {os.cpu_count()} CPUs (shared, noisy: other jobs ran)',
            'onnxruntime': onnxruntime.__version__, 'jax': jax.__version__,
            'ort_intra_op_threads': 'default (one per physical core)'}
  t = time.perf_counter()
  t5onnx.export_onnx(cfg, params, os.path.join(folder, 'f32'))
  result['export_s'] = round(time.perf_counter() - t, 2)
  t = time.perf_counter()
  t5onnx.quantize_int8(os.path.join(folder, 'f32'), os.path.join(folder, 'int8'))
  result['quantize_s'] = round(time.perf_counter() - t, 2)
  result['bytes'] = {'onnx_f32': t5onnx.graph_bytes(os.path.join(folder, 'f32')),
                     'onnx_int8': t5onnx.graph_bytes(os.path.join(folder, 'int8')),
                     't5like_f32_params': weight_bytes(params),
                     't5like_int8_params': weight_bytes(qparams)}
  models = {'onnx_f32': ort.OrtModel(os.path.join(folder, 'f32')),
            'onnx_int8': ort.OrtModel(os.path.join(folder, 'int8'))}
  prepared = {'t5like_f32': (cfg, decode.prepare_params(cfg, params)),
              't5like_int8': (qcfg, decode.prepare_params(qcfg, qparams)),
              't5like_int8_dyn': (dcfg, decode.prepare_params(dcfg, dparams))}
  T = args.new_tokens
  for b in [int(x) for x in args.batches.split(',')]:
    enc = inputs_for(cfg, b, args.input_len)
    runners = {}
    for name, (c, p) in prepared.items():
      runners[name], _ = bench_decode.jax_runner(p, c, b, args.input_len, T)
    for name, m in models.items():
      runners[name] = ort_runner(m, enc, T)
    if args.compare_torch:
      runners['torch_f32'] = bench_decode.torch_runner(cfg, b, args.input_len, T)
    rates = bench_decode.median_rates(runners, b * T, args.runs)
    result[f'b{b}_new_tokens_per_s'] = {k: round(v, 2) for k, v in rates.items()}
    result[f'b{b}_t5like_over_onnx'] = {
        'f32': round(rates['t5like_f32'] / rates['onnx_f32'], 2),
        'int8': round(rates['t5like_int8'] / rates['onnx_int8'], 2),
        'int8_dyn': round(rates['t5like_int8_dyn'] / rates['onnx_int8'], 2)}
  # Parity and agreement on the largest batch's sources.
  enc = inputs_for(cfg, b, args.input_len)
  tokens = {name: np.asarray(decode.greedy(p, c, jnp.asarray(enc, jnp.int32), T,
                                           stop_at_eos=False).tokens)
            for name, (c, p) in prepared.items()}
  logits = {}
  for name, m in models.items():
    tokens[name], _, logits[name] = m.greedy(enc, T, stop_at_eos=False, return_logits=True)
  dec = np.concatenate([np.zeros((b, 1), np.int64), tokens['onnx_f32'][:, :-1]], axis=1)
  want = np.asarray(jax.jit(lambda p, e, d: build_model(cfg).apply({'params': p}, e, d))(
      params, jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32)))
  result['f32_parity'] = {
      'tokens_equal': agreement(tokens['onnx_f32'], tokens['t5like_f32']),
      'max_abs_logit_diff': float(np.abs(logits['onnx_f32'] - want).max()),
      'max_abs_logit': float(np.abs(want).max()),
      'distinct_tokens_per_row': [len(set(r)) for r in tokens['t5like_f32'].tolist()]}
  if os.path.isdir(args.agreement_workdir):
    result['int8_token_agreement'] = trained_agreement(args.agreement_workdir, folder)
  else:
    result['int8_token_agreement'] = f'skipped: {args.agreement_workdir} not found'
  return result


def trained_agreement(workdir: str, folder: str, rows: int = 32, new_tokens: int = 32) -> dict:
  """Token agreement of int8 decoding (see the module docstring) on a trained model."""
  from t5like.data import corpus
  from t5like.serve import bundle as bundle_lib
  b = bundle_lib.load_bundle(bundle_lib.export_from_checkpoint(
      workdir, os.path.join(folder, 'trained_bundle')))
  cfg, params, tok = b.cfg, b.params, b.tokenizer
  _, held_out = corpus.split_documents(corpus.shakespeare_documents(), 0.1)
  ids = [t for d in held_out for t in tok.encode(d.text)]
  inputs = np.zeros((rows, 64), np.int64)
  for r in range(rows):   # 30 tokens, <extra_id_0> for the next 3, 30 more, EOS
    at = (r + 1) * len(ids) // (rows + 2)
    inputs[r] = ids[at:at + 30] + [tok.sentinel_id(0)] + ids[at + 33:at + 65] + [cfg.eos_id]
  t5onnx.export_onnx(cfg, params, os.path.join(folder, 'trained_f32'))
  t5onnx.quantize_int8(os.path.join(folder, 'trained_f32'), os.path.join(folder, 'trained_int8'))
  enc = jnp.asarray(inputs, jnp.int32)
  out = {}
  for name, scheme in (('t5like_f32', None), ('t5like_int8', 'none'),
                       ('t5like_int8_dyn', 'dynamic')):
    p, c = (params, cfg) if scheme is None else quantize_params(params, cfg, 'int8',
                                                                 activation_quant=scheme)
    out[name] = np.asarray(decode.greedy(p, c, enc, new_tokens).tokens)
  for name in ('f32', 'int8'):
    out[f'onnx_{name}'] = ort.OrtModel(os.path.join(folder, f'trained_{name}')).greedy(
        inputs, new_tokens)[0]
  pairs = [('onnx_f32', 't5like_f32'), ('onnx_int8', 't5like_int8'),
           ('onnx_int8', 't5like_int8_dyn'), ('onnx_int8', 'onnx_f32'),
           ('t5like_int8', 't5like_f32'), ('t5like_int8_dyn', 't5like_f32')]
  return {'workdir': workdir, 'model': cfg.name, 'rows': rows, 'new_tokens': new_tokens,
          'distinct_outputs': len({tuple(r) for r in out['t5like_f32'].tolist()}),
          'example': tok.decode(out['t5like_f32'][0]),
          **{f'{a}_vs_{b}': {'rows_identical': agreement((out[a] == out[b]).all(axis=1), True),
                             'tokens_equal': agreement(out[a], out[b])} for a, b in pairs}}


def add_args(parser):
  """`--compare_onnxruntime` (and `--out`, when the subcommand has none) on `bench.py decode`."""
  parser.add_argument('--compare_onnxruntime', action='store_true',
                      help='ONNX Runtime (f32, int8) beside t5like (f32, int8) and, with '
                           '--compare_torch, PyTorch (scripts/bench_onnx.py)')
  parser.add_argument('--agreement_workdir', default='runs/shakespeare_default',
                      help='trained workdir for the int8 token agreement')
  if '--out' not in parser._option_string_actions:
    parser.add_argument('--out', default='', help='also write the JSON record to this file')
