"""ONNX export of a model's encoder and decoder step, for ONNX Runtime (or any ONNX runtime).

  manifest = export_onnx(cfg, params, 'out/')      # encoder.onnx, decoder.onnx, manifest.json
  quantize_int8('out/', 'out_int8/')               # ONNX Runtime dynamic int8 of both graphs

  python -m t5like.infer.onnx --bundle=models/t5_small/1 --out=t5_small_onnx [--int8]

then decode with `python -m t5like.ort --model=t5_small_onnx --ids=...` (t5like/ort.py: numpy and
onnxruntime only). The graphs (t5like/infer/onnx_graphs.py) take the plain training-layout
parameters (or the per-layer decoding layout) of T5 1.0, T5 1.1 and decoder-only models; every
dimension (batch, source, cache length, new tokens) is dynamic, so there are no shape buckets.

Route: the graphs are built directly with `onnx.helper` from the parameter pytree (a few hundred
lines emitting Gather, MatMul, Softmax, ScatterElements, ...), not traced from the JAX model by a
converter. jax2onnx 0.17, the maintained JAX converter, pins orbax-checkpoint < 0.11.37 while t5like
needs orbax-checkpoint 0.12, so it cannot be installed beside t5like (pip refuses the pair); and
a traced graph would carry what the model's decoding path does for XLA, not for ONNX Runtime: the
per-layer nn.scan, the CPU-kernel seams, the `drop`-mode scatter of `write_cache` and a one-hot
relative-position einsum. Built directly, the graphs have named, dynamic inputs and the cache as
plain inputs and outputs, and they are checked against the JAX model (tests/infer/test_onnx.py:
same greedy tokens, logits to f32 tolerance, for each architecture).

The manifest (manifest.json; read and checked by t5like.ort) records the architecture, opset,
dtype, vocabulary size, EOS / pad / decoder start ids, layers, heads, head dim, d_model, the
quantisation, each graph's file and its inputs' and outputs' dtypes and shapes (named dims are
dynamic), and the tokenizer file (with its number of sentinels) when one was copied.

Reading a bundle: the CLI reads a serving bundle's config.json and params.safetensors (the layout
t5like/serve/bundle.py writes) with `read_bundle`, here, because infer sits below serve and does
not import it; a training workdir goes through a bundle first
(`python -m t5like.serve.bundle --workdir=W --out=B`), or call `export_onnx` on restored params.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import onnx

from t5like import ort
from t5like.config import ConfigError, ModelConfig, from_dict
from t5like.data.tokenizer import NUM_EXTRA_IDS
from t5like.infer import onnx_graphs
from t5like.infer.onnx_graphs import OPSET, OnnxExportError, check_exportable
from t5like.models import abstract_params

ENCODER_FILE, DECODER_FILE = 'encoder.onnx', 'decoder.onnx'
TOKENIZER_FILE = 'tokenizer.model'
# Graphs above this many bytes keep their weights in a side file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1 << 30
_ELEM = {onnx.TensorProto.FLOAT: 'float32', onnx.TensorProto.INT64: 'int64',
         onnx.TensorProto.BOOL: 'bool', onnx.TensorProto.INT32: 'int32'}


def check_params(cfg: ModelConfig, params: Mapping[str, Any]) -> None:
  """Raises OnnxExportError unless `params` are the float parameters of `cfg` (training layout)."""
  def walk(tree, path=''):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        yield from walk(v, f'{path}/{k}')
      elif not isinstance(v, (np.ndarray, jax.Array)):
        raise OnnxExportError(f'params{path}/{k} is a {type(v).__name__}, not an array: export '
                              'the training-layout params (not those of decode.prepare_params, '
                              'whose CPU-kernel packing the graphs do not read)')
      else:
        yield f'{path}/{k}', np.shape(v)
  got = dict(walk(params))
  if any('/group_0/' in k for k in got):   # per-layer weights (backend.split_layers)
    return
  want = {f'/{"/".join(k.key for k in path)}': v.shape
          for path, v in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
  bad = [f'{k}: missing' for k in want if k not in got]
  bad += [f'{k}: unexpected' for k in got if k not in want]
  bad += [f'{k}: shape {got[k]}, expected {s}' for k, s in want.items()
          if k in got and tuple(got[k]) != tuple(s)]
  if bad:
    raise OnnxExportError(f'params do not match model {cfg.name!r}: ' + '; '.join(bad[:5]) +
                          (f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''))


def graph_spec(model: onnx.ModelProto, file: str) -> dict:
  """The manifest entry of one graph: its file and its inputs' / outputs' dtypes and shapes."""
  def values(vs):
    return {v.name: {'dtype': _ELEM[v.type.tensor_type.elem_type],
                     'shape': [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
            for v in vs}
  inits = {i.name for i in model.graph.initializer}
  return {'file': file, 'inputs': values(v for v in model.graph.input if v.name not in inits),
          'outputs': values(model.graph.output)}


def _save(model: onnx.ModelProto, path: str) -> None:
  if model.ByteSize() < _EXTERNAL_DATA_BYTES:
    onnx.save_model(model, path)
  else:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + '.data')


def export_onnx(cfg: ModelConfig, params: Mapping[str, Any], out_dir: str, *,
                tokenizer_file: str | None = None, source: str = '') -> dict:
  """Writes the graphs of `cfg` with `params` and their manifest into `out_dir`; returns the
  manifest. Raises OnnxExportError for configs the graphs cannot express (naming the field)."""
  check_exportable(cfg)
  check_params(cfg, params)
  os.makedirs(out_dir, exist_ok=True)
  graphs = {'decoder': (onnx_graphs.decoder_graph(cfg, params), DECODER_FILE)}
  if cfg.is_encdec:
    graphs['encoder'] = (onnx_graphs.encoder_graph(cfg, params), ENCODER_FILE)
  manifest = {
      'format': ort.FORMAT, 'format_version': ort.FORMAT_VERSION, 'architecture': cfg.arch,
      'model_name': cfg.name, 'opset': OPSET, 'dtype': 'float32', 'quantization': 'none',
      'vocab_size': cfg.vocab_size, 'eos_id': cfg.eos_id, 'pad_id': cfg.pad_id,
      'decoder_start_id': cfg.decoder_start_id, 'num_layers': cfg.num_decoder_layers,
      'num_encoder_layers': cfg.num_encoder_layers if cfg.is_encdec else 0,
      'num_heads': cfg.num_heads, 'head_dim': cfg.head_dim, 'd_model': cfg.d_model,
      'ffn_activation': cfg.ffn_activation, 'position': cfg.position,
      'tie_embeddings': cfg.tie_embeddings,
      'cache': {'keys': '[batch, heads, head_dim, cache]', 'values': '[batch, heads, cache, '
                'head_dim]', 'dynamic_dims': ['batch', 'source', 'cache', 'new']},
      'graphs': {}, 'tokenizer': None, 'source': source}
  for name, (model, file) in graphs.items():
    onnx.checker.check_model(model, full_check=False)
    _save(model, os.path.join(out_dir, file))
    manifest['graphs'][name] = graph_spec(model, file)
  if tokenizer_file:
    shutil.copyfile(tokenizer_file, os.path.join(out_dir, TOKENIZER_FILE))
    # Sentinels <extra_id_i> follow the SentencePiece pieces: id = pieces + extra_ids - 1 - i.
    manifest.update(tokenizer=TOKENIZER_FILE, tokenizer_extra_ids=NUM_EXTRA_IDS)
  write_manifest(manifest, out_dir)
  return manifest


def write_manifest(manifest: Mapping, out_dir: str) -> None:
  with open(os.path.join(out_dir, ort.MANIFEST_FILE), 'w') as f:
    json.dump(manifest, f, indent=1)


def quantize_int8(src_dir: str, out_dir: str, per_channel: bool = True) -> dict:
  """ONNX Runtime's dynamic quantisation (int8 weights of every MatMul and of the embedding
  Gather; activations quantised per call) of an exported folder; returns the new manifest."""
  from onnxruntime.quantization import QuantType, quantize_dynamic  # optional dependency
  manifest = ort.read_manifest(src_dir)
  os.makedirs(out_dir, exist_ok=True)
  for spec in manifest['graphs'].values():
    src = os.path.join(src_dir, spec['file'])
    quantize_dynamic(src, os.path.join(out_dir, spec['file']), weight_type=QuantType.QInt8,
                     per_channel=per_channel, op_types_to_quantize=['MatMul', 'Gather'],
                     use_external_data_format=os.path.isfile(src + '.data'))
  if manifest.get('tokenizer'):
    shutil.copyfile(os.path.join(src_dir, manifest['tokenizer']),
                    os.path.join(out_dir, manifest['tokenizer']))
  manifest = dict(manifest, quantization='int8-dynamic' + ('-per-channel' if per_channel else ''))
  write_manifest(manifest, out_dir)
  return manifest


def graph_bytes(directory: str) -> int:
  """Bytes of the folder's graph files (weights included)."""
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if f.endswith('.onnx') or f.endswith('.onnx.data'))


# ---- serving bundles ----------------------------------------------------------------------------

BUNDLE_CONFIG, BUNDLE_PARAMS = 'config.json', 'params.safetensors'


def read_bundle(path: str) -> tuple[ModelConfig, dict]:
  """(config, params as numpy arrays) of a serving bundle folder (t5like/serve/bundle.py)."""
  from safetensors.numpy import load_file   # safetensors is core; deferred like serve/bundle.py
  for f in (BUNDLE_CONFIG, BUNDLE_PARAMS):
    if not os.path.isfile(os.path.join(path, f)):
      raise OnnxExportError(f'{path} is not a model bundle: {f} is missing (export one with '
                            '`python -m t5like.serve.bundle`)')
  try:
    with open(os.path.join(path, BUNDLE_CONFIG)) as f:
      cfg = from_dict(ModelConfig, json.load(f), prefix='model')
  except (json.JSONDecodeError, ConfigError) as e:
    raise OnnxExportError(f'{path}/{BUNDLE_CONFIG} is not a valid model config: {e}') from None
  params: dict = {}
  for key, value in load_file(os.path.join(path, BUNDLE_PARAMS)).items():
    node = params
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return cfg, params


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description='Export a serving bundle as ONNX graphs (encoder, '
                                          'decoder step, manifest).')
  p.add_argument('--bundle', required=True, help='bundle folder (python -m t5like.serve.bundle)')
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--int8', action='store_true',
                 help='also write <out>_int8 with ONNX Runtime dynamic int8 quantisation')
  a = p.parse_args(argv)
  cfg, params = read_bundle(a.bundle)
  tok = os.path.join(a.bundle, TOKENIZER_FILE)
  export_onnx(cfg, params, a.out, tokenizer_file=tok if os.path.isfile(tok) else None,
              source=os.path.abspath(a.bundle))
  print(f'{a.out}: {graph_bytes(a.out) / 1e6:.1f} MB')
  if a.int8:
    quantize_int8(a.out, a.out.rstrip('/') + '_int8')
    print(f'{a.out.rstrip("/")}_int8: {graph_bytes(a.out.rstrip("/") + "_int8") / 1e6:.1f} MB')


if __name__ == '__main__':
  main()
