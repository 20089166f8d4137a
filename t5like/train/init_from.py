"""Start from pretrained weights: parameters (and the tokenizer) of a workdir, bundle or HF folder.

  pre = load_pretrained(path, step='latest')   # Pretrained(cfg, params, tokenizer, source, kind)
  params = merge_params(fresh_params, pre.params, partial='')

`path` is one of
- a t5like training workdir (`checkpoints/` inside): the `'latest'` or `'best'` checkpoint, or a
  step number; its tokenizer is the one the run trained with (`<workdir>/tokenizer/*.model` or the
  saved `data.tokenizer`);
- an exported bundle (`params.safetensors`, `config.json`, `tokenizer.model`);
- a Hugging Face T5 folder (`config.json`, `model.safetensors`, `spiece.model`), read by
  `t5like.models.convert.import_hf_t5`; T5's own 32k-piece `spiece.model` gives the 32,100-id
  vocabulary.
Only parameters are loaded; the optimiser state starts fresh.

`merge_params` requires the loaded tree to match the model's exactly (every key, shape and dtype;
a mismatch is an `InitFromError` naming the keys), unless `partial='encoder'` asks for the encoder
and the shared embedding only, the rest keeping its fresh initialisation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from t5like.config import ConfigError, ModelConfig, from_dict
from t5like.data import tokenizer as tokenizer_lib
from t5like.models import convert
from t5like.train import checkpoint as ckpt_lib

KINDS = ('workdir', 'bundle', 'hf')
PARTIAL = ('', 'encoder')
CHECKPOINT_DIR = ckpt_lib.CHECKPOINT_DIR
# An exported bundle's files (t5like.serve.bundle writes them).
BUNDLE_PARAMS, BUNDLE_CONFIG, BUNDLE_TOKENIZER = 'params.safetensors', 'config.json', 'tokenizer.model'
HF_TOKENIZER = 'spiece.model'


class InitFromError(ValueError):
  """Pretrained weights cannot be found or do not fit the model; the message names them."""


@dataclasses.dataclass
class Pretrained:
  cfg: ModelConfig
  params: Any                 # nested dict of host numpy arrays
  tokenizer: tokenizer_lib.Tokenizer
  source: str
  kind: str


def detect_kind(path: str) -> str:
  if not os.path.isdir(path):
    raise InitFromError(f'init_from={path!r} does not exist or is not a folder; give a t5like '
                        'workdir, an exported bundle or a Hugging Face T5 folder')
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return 'workdir'
  if os.path.isfile(os.path.join(path, BUNDLE_PARAMS)):
    return 'bundle'
  if os.path.isfile(os.path.join(path, convert.WEIGHTS_FILE)) or os.path.isfile(
      os.path.join(path, convert.WEIGHTS_INDEX_FILE)):
    return 'hf'
  raise InitFromError(f'init_from={path!r} is neither a t5like workdir ({CHECKPOINT_DIR}/), a '
                      f'bundle ({BUNDLE_PARAMS}) nor a Hugging Face T5 folder '
                      f'({convert.WEIGHTS_FILE}); found {sorted(os.listdir(path))[:10]}')


def workdir_tokenizer_path(workdir: str, saved_config: Mapping[str, Any]) -> str:
  explicit = (saved_config.get('data') or {}).get('tokenizer') or ''
  if explicit:
    return explicit
  folder = os.path.join(workdir, 'tokenizer')
  found = sorted(f for f in os.listdir(folder) if f.endswith('.model')) if os.path.isdir(folder) else []
  if len(found) != 1:
    raise InitFromError(f'cannot tell which tokenizer {workdir} was trained with: {folder} holds '
                        f'{found or "no .model files"}')
  return os.path.join(folder, found[0])


def best_checkpoint_options(best_metric: str) -> dict[str, str]:
  """Checkpointer options of a run that keeps its best checkpoints by task metric `best_metric`
  (higher is better; saved as 'task/<metric>'); {} for the default, the validation loss."""
  return {'best_metric': f'task/{best_metric}', 'best_mode': 'max'} if best_metric else {}


def _saved_best_metric(workdir: str) -> str:
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return ((json.load(f).get('task') or {}).get('best_metric')) or ''
  except (OSError, ValueError):
    return ''


def _restore_workdir(workdir: str, step) -> tuple[Any, dict, int]:
  # 'best' is by the metric the run kept its best checkpoints by (its config.json).
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), async_save=False, keep_best=0,
                               **best_checkpoint_options(_saved_best_metric(workdir)))
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise InitFromError(f'{workdir}/{CHECKPOINT_DIR} holds no checkpoint; train first')
    if step in ('latest', None, ''):
      step = ckpt.latest_step()
    elif step == 'best':
      best = ckpt.best_step()
      if best is None:
        raise InitFromError(f'{workdir} has no checkpoint saved with a validation metric; use '
                            "init_step='latest'")
      step = best
    else:
      try:
        step = int(step)
      except (TypeError, ValueError):
        raise InitFromError(f"init_step={step!r} is not valid; use 'latest', 'best' or a step "
                            'number') from None
      if step not in steps:
        raise InitFromError(f'{workdir} has no checkpoint at step {step}; it has {steps}')
  finally:
    ckpt.close()
  return ckpt_lib.restore_params(workdir, step)


def load_pretrained(path: str, step='latest') -> Pretrained:
  """Parameters, model config and tokenizer of `path` (see the module docstring)."""
  path = os.path.abspath(path)
  kind = detect_kind(path)
  if kind == 'workdir':
    params, config, step = _restore_workdir(path, step)
    cfg = from_dict(ModelConfig, config['model'], prefix='model')
    tok = tokenizer_lib.Tokenizer.from_file(workdir_tokenizer_path(path, config))
    source = f'{path}/{CHECKPOINT_DIR}/{step}'
  elif kind == 'bundle':
    from safetensors.numpy import load_file  # optional heavy import, only for bundles
    for f in (BUNDLE_CONFIG, BUNDLE_TOKENIZER):
      if not os.path.isfile(os.path.join(path, f)):
        raise InitFromError(f'bundle {path} has no {f}; re-export it')
    try:
      with open(os.path.join(path, BUNDLE_CONFIG)) as f:
        cfg = from_dict(ModelConfig, json.load(f), prefix='model')
    except (ValueError, ConfigError) as e:
      raise InitFromError(f'{path}/{BUNDLE_CONFIG} is not a valid model config: {e}') from None
    flat = load_file(os.path.join(path, BUNDLE_PARAMS))
    params: dict = {}
    for key, value in flat.items():
      node = params
      *parents, leaf = key.split('/')
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    tok = tokenizer_lib.Tokenizer.from_file(os.path.join(path, BUNDLE_TOKENIZER))
    source = path
  else:
    cfg, params = convert.import_hf_t5(path)
    spiece = os.path.join(path, HF_TOKENIZER)
    if not os.path.isfile(spiece):
      raise InitFromError(f'Hugging Face folder {path} has no {HF_TOKENIZER}; copy the '
                          "tokenizer's spiece.model next to its weights")
    tok = tokenizer_lib.Tokenizer.from_file(spiece)
    source = path
  if tok.vocab_size > cfg.vocab_size:
    raise InitFromError(f'{source}: its tokenizer has {tok.vocab_size} ids, more than the '
                        f'model\'s vocab_size {cfg.vocab_size}')
  return Pretrained(cfg, params, tok, source, kind)


def _flat(tree) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merge_params(target, loaded, *, partial: str = '', source: str = 'the pretrained weights'):
  """`target` (fresh params or their shapes) with leaves replaced by `loaded`'s (numpy).

  partial='': every leaf must match by key and shape; 'encoder': the leaves under encoder/ and
  shared_embedding/ are taken, the others keep `target`'s values.
  """
  if partial not in PARTIAL:
    raise InitFromError(f'init_partial={partial!r} is not valid; choose one of {list(PARTIAL)}')
  want, got = _flat(target), _flat(loaded)
  if partial:
    chosen = {k for k in want if k.split('/', 1)[0] in ('encoder', 'shared_embedding')}
  else:
    chosen = set(want)
  missing = sorted(chosen - set(got))
  extra = sorted(set(got) - set(want)) if not partial else []
  shapes = sorted(f'{k}: {tuple(np.shape(got[k]))} vs model {tuple(want[k].shape)}'
                  for k in chosen & set(got) if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or extra or shapes:
    raise InitFromError(
        f'{source} do not fit this model: missing keys {missing[:8]}, unexpected keys '
        f'{extra[:8]}, shape mismatches {shapes[:8]}. Use the architecture they were trained '
        "with (the model config is taken from init_from), or init_partial='encoder' to load the "
        'encoder only')
  out = {k: (np.asarray(got[k]).astype(want[k].dtype) if k in chosen else want[k]) for k in want}
  treedef = jax.tree_util.tree_structure(target)
  keys = list(_flat(target))
  return jax.tree_util.tree_unflatten(treedef, [out[k] for k in keys])
