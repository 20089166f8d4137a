"""Greedy decoding of exported t5like models with ONNX Runtime: numpy and onnxruntime only.

This module imports neither jax nor the rest of t5like, so a serving host needs only
`pip install onnxruntime numpy` (plus sentencepiece for --text) and the folder that
`python -m t5like.infer.onnx` wrote (the graphs are described in t5like/infer/onnx_graphs.py):

  model = OrtModel('t5_small_onnx')                 # reads and checks manifest.json
  tokens_BT, lengths_B = model.greedy(inputs_BS, max_new_tokens=64)

  python -m t5like.ort --model=t5_small_onnx --ids=37,423,8,1 --max_new_tokens=32
  python -m t5like.ort --model=t5_small_onnx --text="The cute dog <extra_id_0> the ball."

`inputs` are encoder tokens [B, S] (0 = padding) for an encoder-decoder model, or right-padded
prompts [B, P] for a decoder-only model, exactly as `t5like.infer.decode.greedy` takes them, and
the loop is that function's: the same prefill, per-row cache positions, argmax (lowest index on
ties), per-row stop at EOS (later positions hold 0). The cache holds prompt + new tokens, keys
[B, N, H, C] and values [B, N, C, H].

The manifest is checked against the graphs on load: every input and output the manifest lists
must exist in the graph with that dtype and shape (named dims are dynamic), the cache must have
one key and value per layer, and the logits' last dim must be the vocabulary size; a mismatch
raises ManifestError naming the graph, the tensor and both values.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

MANIFEST_FILE = 'manifest.json'
FORMAT = 't5like-onnx'
FORMAT_VERSION = 1
REQUIRED = ('format', 'format_version', 'architecture', 'opset', 'vocab_size', 'eos_id', 'pad_id',
            'decoder_start_id', 'num_layers', 'num_heads', 'head_dim', 'd_model', 'dtype',
            'quantization', 'graphs')
_DTYPES = {'tensor(float)': 'float32', 'tensor(int64)': 'int64', 'tensor(bool)': 'bool',
           'tensor(int32)': 'int32', 'tensor(float16)': 'float16'}


class ManifestError(ValueError):
  """The manifest is missing, malformed, or does not describe the graphs beside it."""


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise ManifestError(f'{directory} has no {MANIFEST_FILE}: export the model with '
                        '`python -m t5like.infer.onnx --bundle=DIR --out=DIR`')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ManifestError(f'{path} is not valid JSON ({e}); re-export the model') from None
  missing = [k for k in REQUIRED if k not in manifest]
  if missing:
    raise ManifestError(f'{path} lacks {missing}; re-export the model')
  if manifest['format'] != FORMAT or manifest['format_version'] > FORMAT_VERSION:
    raise ManifestError(f'{path}: format {manifest["format"]!r} version '
                        f'{manifest["format_version"]}; this reader takes {FORMAT!r} up to '
                        f'version {FORMAT_VERSION}')
  if manifest['architecture'] not in ('encdec', 'decoder'):
    raise ManifestError(f'{path}: architecture {manifest["architecture"]!r} is neither '
                        "'encdec' nor 'decoder'")
  want = ('encoder', 'decoder') if manifest['architecture'] == 'encdec' else ('decoder',)
  if sorted(manifest['graphs']) != sorted(want):
    raise ManifestError(f'{path}: graphs {sorted(manifest["graphs"])}, expected {list(want)} for '
                        f'architecture {manifest["architecture"]!r}')
  return manifest


def io_spec(values) -> dict:
  """{name: {'dtype', 'shape'}} of an ONNX Runtime session's inputs or outputs (named dims as
  strings)."""
  return {v.name: {'dtype': _DTYPES.get(v.type, v.type), 'shape': list(v.shape)} for v in values}


def check_graph(manifest: Mapping, graph: str, session) -> None:
  """Raises ManifestError where `session`'s inputs / outputs differ from the manifest's."""
  where = f'{MANIFEST_FILE} vs {manifest["graphs"][graph]["file"]}'
  for side, actual in (('inputs', io_spec(session.get_inputs())),
                       ('outputs', io_spec(session.get_outputs()))):
    listed = manifest['graphs'][graph][side]
    if sorted(listed) != sorted(actual):
      raise ManifestError(f'{where}: {graph} {side} differ: the manifest lists '
                          f'{sorted(set(listed) - set(actual))} that the graph lacks and the '
                          f'graph has {sorted(set(actual) - set(listed))} that it does not list')
    for name, spec in listed.items():
      for key in ('dtype', 'shape'):
        if spec.get(key) != actual[name][key]:
          raise ManifestError(f'{where}: {graph} {side[:-1]} {name!r} has {key} '
                              f'{actual[name][key]} in the graph but {spec.get(key)} in the '
                              'manifest')
  L, N, H = manifest['num_layers'], manifest['num_heads'], manifest['head_dim']
  outs = manifest['graphs'][graph]['outputs']
  prefix = 'present' if graph == 'decoder' else 'cross'
  for l in range(L):
    for name in (f'{prefix}_key_{l}', f'{prefix}_value_{l}'):
      if name not in outs:
        raise ManifestError(f'{where}: num_layers={L} but the {graph} has no output {name!r}')
  if f'{prefix}_key_{L}' in outs:
    raise ManifestError(f'{where}: num_layers={L} but the {graph} has more cache outputs')
  if graph != 'decoder':
    return
  if outs['present_key_0']['shape'][1:3] != [N, H]:
    raise ManifestError(f'{where}: num_heads={N}, head_dim={H} but the cache keys have shape '
                        f'{outs["present_key_0"]["shape"]}')
  if outs['logits']['shape'][-1] != manifest['vocab_size']:
    raise ManifestError(f'{where}: vocab_size={manifest["vocab_size"]} but the decoder\'s '
                        f'logits have {outs["logits"]["shape"][-1]} columns')


class OrtModel:
  """The graphs of one exported model in ONNX Runtime sessions, checked against the manifest."""

  def __init__(self, directory: str, providers=('CPUExecutionProvider',),
               session_options=None):
    import onnxruntime as ort   # deferred: the manifest helpers above work without it
    self.directory = directory
    self.manifest = read_manifest(directory)
    self.sessions = {}
    for graph, spec in self.manifest['graphs'].items():
      path = os.path.join(directory, spec['file'])
      if not os.path.isfile(path):
        raise ManifestError(f'{directory}: {MANIFEST_FILE} names {spec["file"]!r}, which is '
                            'missing')
      self.sessions[graph] = ort.InferenceSession(path, sess_options=session_options,
                                                  providers=list(providers))
      check_graph(self.manifest, graph, self.sessions[graph])
    m = self.manifest
    self.is_encdec = m['architecture'] == 'encdec'
    self.L, self.N, self.H = m['num_layers'], m['num_heads'], m['head_dim']
    self._outputs = ['logits'] + [f'present_{kv}_{l}' for l in range(self.L)
                                  for kv in ('key', 'value')]

  def _cache(self, B: int, C: int) -> dict:
    feed = {}
    for l in range(self.L):
      feed[f'past_key_{l}'] = np.zeros((B, self.N, self.H, C), np.float32)
      feed[f'past_value_{l}'] = np.zeros((B, self.N, C, self.H), np.float32)
    return feed

  def _step(self, feed: dict, tokens_BT, index_B):
    """Runs the decoder graph: logits [B, T, V]; `feed`'s cache replaced by the new one."""
    feed['input_ids'], feed['cache_index'] = tokens_BT, index_B
    outs = self.sessions['decoder'].run(self._outputs, feed)
    for name, value in zip(self._outputs[1:], outs[1:]):
      feed[name.replace('present_', 'past_')] = value
    return outs[0]

  def prefill(self, inputs_BS, max_new_tokens: int):
    """(decoder feed holding the cache, logits [B, V] of the first new token, cache index [B])."""
    inputs_BS = np.asarray(inputs_BS, np.int64)
    B, S = inputs_BS.shape
    if self.is_encdec:
      enc = self.sessions['encoder']
      cross = dict(zip([o.name for o in enc.get_outputs()],
                       enc.run(None, {'input_ids': inputs_BS})))
      feed = dict(self._cache(B, max_new_tokens), **cross,
                  encoder_attention_mask=(inputs_BS != self.manifest['pad_id']).astype(np.int64))
      start = np.full((B, 1), self.manifest['decoder_start_id'], np.int64)
      logits = self._step(feed, start, np.zeros((B,), np.int64))
      return feed, logits[:, 0], np.ones((B,), np.int64)
    lengths_B = prompt_lengths(inputs_BS)
    feed = self._cache(B, S + max_new_tokens)
    logits_BSV = self._step(feed, inputs_BS, np.zeros((B,), np.int64))
    return feed, logits_BSV[np.arange(B), lengths_B - 1], lengths_B

  def greedy(self, inputs_BS, max_new_tokens: int, stop_at_eos: bool = True,
             return_logits: bool = False):
    """(tokens [B, T] int64 with 0 after EOS, lengths [B] including the EOS) and, with
    `return_logits`, the logits [B, T, V] each token was chosen from."""
    feed, logits_BV, index_B = self.prefill(inputs_BS, max_new_tokens)
    B, eos = logits_BV.shape[0], self.manifest['eos_id']
    out_BT = np.zeros((B, max_new_tokens), np.int64)
    done_B = np.zeros((B,), bool)
    lengths_B = np.zeros((B,), np.int64)
    seen = []
    for i in range(max_new_tokens):
      if return_logits:
        seen.append(logits_BV)
      tok_B = np.where(done_B, 0, np.argmax(logits_BV, axis=-1))
      lengths_B += ~done_B
      out_BT[:, i] = tok_B
      if stop_at_eos:
        done_B |= tok_B == eos
      if i == max_new_tokens - 1 or done_B.all():
        break
      logits_BV = self._step(feed, tok_B[:, None], index_B)[:, 0]
      index_B = index_B + 1
    if return_logits:
      return out_BT, lengths_B, np.stack(seen, axis=1)
    return out_BT, lengths_B


def prompt_lengths(prompts_BP) -> np.ndarray:
  """Length of each right-padded prompt (last non-zero token + 1, at least 1)."""
  nonzero = np.asarray(prompts_BP) != 0
  last = nonzero.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
  return np.where(nonzero.any(axis=1), last, 1).astype(np.int64)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description='Greedy decoding of an exported t5like model with ONNX '
                                          'Runtime (no jax).')
  p.add_argument('--model', required=True, help='folder written by python -m t5like.infer.onnx')
  p.add_argument('--ids', action='append', default=[],
                 help='comma-separated token ids of one input (repeat for a batch)')
  p.add_argument('--text', action='append', default=[],
                 help='input text (repeat for a batch); needs tokenizer.model in --model')
  p.add_argument('--max_new_tokens', type=int, default=32)
  a = p.parse_args(argv)
  model = OrtModel(a.model)
  sp = None
  rows: list[list[int]] = [[int(t) for t in s.split(',') if t.strip()] for s in a.ids]
  if a.text:
    import sentencepiece as spm   # deferred: only --text needs it
    tok_file = model.manifest.get('tokenizer')
    if not tok_file or not os.path.isfile(os.path.join(a.model, tok_file)):
      sys.exit(f'{a.model} holds no tokenizer; pass --ids instead of --text')
    sp = spm.SentencePieceProcessor(model_file=os.path.join(a.model, tok_file))
    top = sp.get_piece_size() + model.manifest.get('tokenizer_extra_ids', 0) - 1
    eos = [model.manifest['eos_id']] if model.is_encdec else []
    rows += [encode(sp, t, top) + eos for t in a.text]
  if not rows:
    sys.exit('pass --ids or --text')
  inputs = np.zeros((len(rows), max(map(len, rows))), np.int64)
  for r, ids in enumerate(rows):
    inputs[r, :len(ids)] = ids
  tokens, lengths = model.greedy(inputs, a.max_new_tokens)
  for row, n in zip(tokens, lengths):
    ids = [int(t) for t in row[:n]]
    print(decode(sp, ids, top) if sp else ','.join(map(str, ids)))


_SENTINEL = re.compile(r'<extra_id_(\d+)>')


def encode(sp, text: str, top: int) -> list[int]:
  """SentencePiece ids of `text`, with `<extra_id_i>` as sentinel id `top - i`."""
  ids, pos = [], 0
  for m in _SENTINEL.finditer(text):
    ids += sp.encode(text[pos:m.start()], out_type=int) + [top - int(m.group(1))]
    pos = m.end()
  return ids + sp.encode(text[pos:], out_type=int)


def decode(sp, ids, top: int) -> str:
  """Text of `ids`: sentinels as `<extra_id_i>`, pad and EOS as nothing."""
  out, run = [], []
  for t in ids:
    if t < sp.get_piece_size():
      run.append(t)
      continue
    out.append(sp.decode(run) + f'<extra_id_{top - t}>')
    run = []
  return ''.join(out) + sp.decode(run)


if __name__ == '__main__':
  main()
