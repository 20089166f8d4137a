"""Model bundles: what the server loads, exported from parameters or a training checkpoint.

A bundle is one folder (TF Serving's layout puts it at `<base_path>/<name>/<version>/`):

  params.safetensors   the parameter pytree, one tensor per leaf keyed by its '/'-joined path
                       (float, bf16, int8 or packed-int4 uint8 leaves alike: quantised models too)
  config.json          the ModelConfig the params run under (quantisation fields included)
  tokenizer.model      the SentencePiece model (T5 layout, see t5like.data.tokenizer)
  bundle.json          format version, parameter count and bytes, where it came from, and the
                       manifest: each file's size (written last; `check_complete` reads it)
  chat_template.jinja  optional: the chat template (t5like.serve.chat)

Files are written 0644 and the folder 0755 (less the umask), so a server running as another user
can read them.

`export_bundle(params, cfg, tokenizer, out_dir)` writes one atomically (a temporary sibling
folder renamed into place), `export_from_checkpoint(workdir, out_dir)` restores the params of a
training checkpoint (t5like.train.checkpoint: `<workdir>/checkpoints/<step>/state`) without the
optimizer's target shapes, and `load_bundle(path)` reads one back, checking shapes and dtypes
against the config before any array reaches the device.

Written here: the layout and checks. safetensors (in the core dependencies) stores the arrays;
orbax reads the training checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from t5like.compress.quantize import abstract_quantized_params
from t5like.config import ConfigError, ModelConfig, from_dict, to_dict
from t5like.data.tokenizer import Tokenizer, TokenizerError
from t5like.models import abstract_params
from t5like.models.transformer import dummy_inputs
from t5like.train import checkpoint as ckpt_lib

FORMAT_VERSION = 1
PARAMS_FILE = 'params.safetensors'
CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
META_FILE = 'bundle.json'
_SEP = '/'


class BundleError(ValueError):
  """A bundle cannot be written or read; the message names the path and what is wrong."""


class BundleIncomplete(BundleError):
  """The folder is not (yet) a whole bundle: its manifest is missing or its files are not the
  sizes the manifest lists, as while it is being copied."""


class BundleUnreadable(BundleError):
  """The server's user may not read the bundle's files (a permission problem, not a bad bundle)."""


@dataclasses.dataclass
class Bundle:
  path: str
  cfg: ModelConfig
  params: Any              # nested dict of numpy arrays (host memory)
  tokenizer: Tokenizer
  meta: dict


def _flatten(tree: Mapping) -> dict[str, np.ndarray]:
  """'a/b/kernel' -> host array; a key holding the separator would not round-trip, so it is refused."""
  flat = traverse_util.flatten_dict(dict(tree))
  for path in flat:
    bad = [k for k in path if _SEP in str(k)]
    if bad:
      raise BundleError(f'parameter key {bad[0]!r} contains {_SEP!r}; keys must not')
  return {_SEP.join(map(str, path)): np.asarray(jax.device_get(v)) for path, v in flat.items()}


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep=_SEP)


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def export_bundle(params, cfg: ModelConfig, tokenizer: Tokenizer, out_dir: str, *,
                  source: str = '', overwrite: bool = False) -> str:
  """Writes a bundle of (possibly quantised) `params` run by `cfg`; returns its path."""
  from safetensors.numpy import save_file
  if tokenizer.vocab_size > cfg.vocab_size:
    raise BundleError(f'tokenizer has {tokenizer.vocab_size} ids but model {cfg.name!r} has '
                      f'vocab_size {cfg.vocab_size}; export the tokenizer the model was trained with')
  _check_params(_flatten(params), cfg, where='params to export')
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    if not overwrite:
      raise BundleError(f'{out_dir} exists; choose a new version folder or pass overwrite=True')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out_dir)}.tmp')
  try:
    flat = _flatten(params)
    save_file(flat, os.path.join(tmp, PARAMS_FILE), metadata={'format': 't5like'})
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
    _write_bytes(os.path.join(tmp, TOKENIZER_FILE), tokenizer.model_proto)
    meta = {'format_version': FORMAT_VERSION, 'created': time.time(), 'source': source,
            'param_count': int(sum(v.size for v in flat.values())),
            'param_bytes': int(sum(v.nbytes for v in flat.values())),
            'weight_quant': cfg.quant.weights, 'tokenizer_vocab_size': tokenizer.vocab_size,
            'files': {f: os.path.getsize(os.path.join(tmp, f))
                      for f in (PARAMS_FILE, CONFIG_FILE, TOKENIZER_FILE)}}
    with open(os.path.join(tmp, META_FILE), 'w') as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    _make_readable(tmp)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _make_readable(folder: str) -> None:
  """Files 0644 and the folder 0755, less the umask (mkdtemp made the folder 0700)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(folder, 0o755 & ~umask)
  for f in os.listdir(folder):
    os.chmod(os.path.join(folder, f), 0o644 & ~umask)


def check_complete(path: str) -> dict:
  """The manifest of a whole bundle; BundleIncomplete while files are missing or still growing
  (the manifest, bundle.json, is written last by `export_bundle`: copy it last, or copy the
  folder under a hidden name and rename it). A manifest without sizes (older exports) only needs
  the files to exist."""
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise BundleIncomplete(f'{path} has no {META_FILE} yet (a bundle still being copied, or not a '
                           'bundle): it is loaded once complete')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except PermissionError as e:
    raise BundleUnreadable(f'{meta_path}: permission denied ({e.strerror}); the server\'s user needs '
                      f'read access: chmod -R a+rX the bundle folder') from e
  except (OSError, ValueError) as e:
    raise BundleIncomplete(f'{meta_path} cannot be read yet ({e})') from None
  if not isinstance(meta, dict):
    raise BundleError(f'{meta_path} is not a JSON object')
  files = meta.get('files') or {f: None for f in (PARAMS_FILE, CONFIG_FILE, TOKENIZER_FILE)}
  if not isinstance(files, dict):
    raise BundleError(f'{meta_path}: "files" must map file names to sizes')
  for name, size in files.items():
    f = os.path.join(path, str(name))
    if not os.path.isfile(f):
      raise BundleIncomplete(f'{path}: {name} is missing (manifest {META_FILE} lists it)')
    if size is not None and os.path.getsize(f) != size:
      raise BundleIncomplete(f'{path}: {name} has {os.path.getsize(f)} bytes, the manifest says '
                             f'{size} (still being copied, or truncated: re-export it)')
  return meta


def _expected_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes the config's model has (float or quantised), without allocating."""
  if cfg.quant.weights == 'none':
    return _flatten_abstract(abstract_params(cfg))
  float_cfg = cfg.with_quant(weights='none', activations='none')
  kw = {}
  if cfg.quant.activations == 'static':  # scale values need calibration, their shapes do not
    kw['calibration_inputs'] = dummy_inputs(float_cfg)
  qparams = abstract_quantized_params(float_cfg, cfg.quant.weights,
                                      group_size=cfg.quant.group_size,
                                      activation_quant=cfg.quant.activations, **kw)
  return _flatten_abstract(qparams)


def _flatten_abstract(tree) -> dict:
  return traverse_util.flatten_dict(dict(tree), sep=_SEP)


def _check_params(flat: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> None:
  try:
    want = _expected_shapes(cfg)
  except Exception as e:  # a config whose model cannot be built, or missing calibration info
    raise BundleError(f'{where}: cannot build model {cfg.name!r} from its config ({e})') from e
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    raise BundleError(f'{where} do not match model {cfg.name!r}: missing {missing[:5]}, '
                      f'unexpected {extra[:5]} (of {len(want)} expected leaves); was it saved '
                      'with another config?')
  def wrong(k, s):
    if tuple(flat[k].shape) != tuple(s.shape):
      return True
    # Quantisation scales may be stored in f32 or bf16 (quantize_params' scale_dtype).
    return not k.endswith('scale') and np.dtype(flat[k].dtype) != np.dtype(s.dtype)
  bad = [f'{k}: {flat[k].shape} {flat[k].dtype}, expected {tuple(s.shape)} {s.dtype}'
         for k, s in want.items() if wrong(k, s)]
  if bad:
    raise BundleError(f'{where} have the wrong shapes or dtypes for model {cfg.name!r}: '
                      + '; '.join(bad[:5]))


def load_bundle(path: str) -> Bundle:
  """Reads and checks a bundle (params stay in host memory)."""
  from safetensors.numpy import load_file
  path = os.path.abspath(path)
  for f in (PARAMS_FILE, CONFIG_FILE, TOKENIZER_FILE):
    if not os.path.isfile(os.path.join(path, f)):
      raise BundleError(f'{path} is not a model bundle: {f} is missing (export one with '
                        't5like.serve.bundle.export_bundle or `python -m t5like.serve.bundle`)')
  for f in [path] + [os.path.join(path, f) for f in os.listdir(path)]:
    if not os.access(f, os.R_OK | (os.X_OK if os.path.isdir(f) else 0)):
      mode = oct(os.stat(f).st_mode & 0o777)
      raise BundleUnreadable(f'{f}: permission denied (mode {mode}); the server\'s user needs '
                             'read access: chmod -R a+rX the bundle folder')
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      cfg = from_dict(ModelConfig, json.load(f), prefix='model')
  except (ValueError, TypeError, AttributeError, ConfigError) as e:   # bad JSON, types, values
    raise BundleError(f'{path}/{CONFIG_FILE} is not a valid model config: {e}') from None
  meta = {}
  if os.path.isfile(os.path.join(path, META_FILE)):
    try:
      with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
      version = meta.get('format_version', FORMAT_VERSION)
    except (ValueError, AttributeError) as e:
      raise BundleError(f'{path}/{META_FILE} is not a JSON object ({e})') from None
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
      raise BundleError(f'{path} has bundle format {version!r}; this t5like reads formats up to '
                        f'{FORMAT_VERSION}: upgrade t5like or re-export the bundle')
  try:
    flat = load_file(os.path.join(path, PARAMS_FILE))
  except Exception as e:
    raise BundleError(f'{path}/{PARAMS_FILE} cannot be read ({e}); it is corrupt or truncated: '
                      're-export the bundle') from None
  _check_params(flat, cfg, where=f'params in {path}')
  try:
    tok = Tokenizer.from_file(os.path.join(path, TOKENIZER_FILE))
  except (TokenizerError, ValueError, RuntimeError, OSError) as e:
    raise BundleError(f'{path}: broken tokenizer: {e}') from None
  if tok.vocab_size > cfg.vocab_size:
    raise BundleError(f'{path}: tokenizer has {tok.vocab_size} ids, more than the model\'s '
                      f'vocab_size {cfg.vocab_size}')
  return Bundle(path, cfg, _unflatten(flat), tok, meta)


# ---- training checkpoints ------------------------------------------------------------------------

def _find_tokenizer(workdir: str, saved_config: Mapping[str, Any]) -> str:
  explicit = (saved_config.get('data') or {}).get('tokenizer') or ''
  if explicit:
    return explicit
  folder = os.path.join(workdir, 'tokenizer')
  found = sorted(f for f in os.listdir(folder) if f.endswith('.model')) if os.path.isdir(folder) else []
  if len(found) != 1:
    raise BundleError(f'cannot tell which tokenizer {workdir} was trained with: {folder} holds '
                      f'{found or "no .model files"}; pass tokenizer_path=')
  return os.path.join(folder, found[0])


def export_from_checkpoint(workdir: str, out_dir: str, *, step: int | None = None,
                           tokenizer_path: str = '', quantize: str = 'none',
                           overwrite: bool = False) -> str:
  """Exports the params of `<workdir>/checkpoints/<step>` (latest if None) as a bundle,
  optionally quantised ('int8' / 'int4', t5like.compress.quantize)."""
  try:
    params, config, step = ckpt_lib.restore_params(workdir, step)
  except ckpt_lib.CheckpointError as e:
    raise BundleError(str(e)) from e
  cfg = from_dict(ModelConfig, config['model'], prefix='model')
  tok = Tokenizer.from_file(tokenizer_path or _find_tokenizer(workdir, config))
  if quantize != 'none':
    from t5like.compress.quantize import quantize_params
    params, cfg = quantize_params(params, cfg, quantize)
  return export_bundle(params, cfg, tok, out_dir, overwrite=overwrite,
                       source=os.path.join(os.path.abspath(workdir), ckpt_lib.CHECKPOINT_DIR,
                                           str(step)) + (f' ({quantize})' if quantize != 'none' else ''))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description='Export a serving bundle from a t5like training workdir.')
  p.add_argument('--workdir', required=True, help='training workdir (holds checkpoints/)')
  p.add_argument('--out', required=True, help='bundle folder, e.g. models/<name>/<version>')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add_argument('--tokenizer', default='', help='spiece.model (default: the workdir\'s)')
  p.add_argument('--quantize', default='none', choices=('none', 'int8', 'int4'))
  p.add_argument('--overwrite', action='store_true')
  a = p.parse_args(argv)
  print(export_from_checkpoint(a.workdir, a.out, step=a.step, tokenizer_path=a.tokenizer,
                               quantize=a.quantize, overwrite=a.overwrite))


if __name__ == '__main__':
  main()
