"""Task evaluation: batched decoding, postprocessing, task metrics; scoring and rank classification.

  generate(params, cfg, tokenizer, inputs, ...)          -> predicted texts (greedy or beam search
                                                            through `t5like.infer.decode`)
  score(params, cfg, tokenizer, inputs, targets, ...)    -> log p(target | input) per example
                                                            (sum over the target's tokens + EOS)
  rank_classify(params, cfg, tokenizer, inputs, labels)  -> the label of highest log-likelihood
  evaluate_task(params, cfg, tokenizer, task, split, ...) -> metrics (+ CIs, baselines) and
                                                            per-example predictions

Inputs longer than the encoder length S are cut to fit (keeping EOS) and targets longer than the
decoder length T likewise when scored; both are counted and logged, never silent. Rows are padded
to fixed shapes [batch_size, S] so every batch reuses one compiled program.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5like.config import ModelConfig
from t5like.data import objectives, packing
from t5like.data import task_pipeline
from t5like.data.tasks import Task, TaskError
from t5like.data.tasks import metrics as metrics_lib
from t5like.infer import decode
from t5like.models import build_model
from t5like.train import metrics as train_metrics
from t5like.train import step as step_lib

log = logging.getLogger(__name__)

DECODE_METHODS = ('greedy', 'beam')


class Progress:
  """Prints 'what i/n [p%] elapsed, ETA' at most every `every_s` seconds (and at the end)."""

  def __init__(self, what: str, total: int, print_fn: Callable[[str], None] | None,
               every_s: float = 10.0):
    self.what, self.total, self.print_fn, self.every_s = what, total, print_fn, every_s
    self.t0 = self.last = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if self.print_fn is None or (now - self.last < self.every_s and done < self.total):
      return
    self.last = now
    elapsed = now - self.t0
    eta = elapsed / done * (self.total - done) if done else float('nan')
    self.print_fn(f'{self.what} {done}/{self.total} [{100 * done / max(self.total, 1):.0f}%] '
                  f'{train_metrics.format_duration(elapsed)} elapsed, ETA '
                  f'{train_metrics.format_duration(eta) if done else "?"}')


def encode_rows(tokenizer, texts: Sequence[str], length: int, what: str) -> np.ndarray:
  """[N, length] ids of `texts` + EOS, right-padded; longer ones cut (counted, logged)."""
  rows = np.zeros((len(texts), length), np.int32)
  cut = 0
  for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
    if len(ids) + 1 > length:
      cut += 1
      ids = ids[:length - 1]
    rows[i, :len(ids)] = ids
    rows[i, len(ids)] = tokenizer.eos_id
  if cut:
    log.warning('%s: %d of %d inputs are longer than %d tokens and were cut to fit', what, cut,
                len(texts), length)
  return rows


def _decoding_params(cfg: ModelConfig, params):
  # Decoding runs on one device: sharded training params are gathered first (small models; a
  # sharded decode is the engine's business).
  return decode.prepare_params(cfg, jax.device_get(params))


def generate(params, cfg: ModelConfig, tokenizer, inputs: Sequence[str], *,
             max_input_length: int, max_decode_length: int, batch_size: int = 32,
             method: str = 'greedy', num_beams: int = 4, alpha: float = 0.6,
             print_fn: Callable[[str], None] | None = None) -> list[str]:
  """Decoded texts (EOS and what follows removed) for `inputs` (already preprocessed)."""
  if method not in DECODE_METHODS:
    raise TaskError(f'decode method {method!r} is not valid; choose one of {list(DECODE_METHODS)}')
  if method == 'beam' and not cfg.is_encdec:
    raise TaskError('beam search needs an encoder-decoder model; use method=greedy')
  if not inputs:
    return []
  rows = encode_rows(tokenizer, inputs, max_input_length, 'generate')
  dparams = _decoding_params(cfg, params)
  out: list[str] = []
  progress = Progress('decoding', len(inputs), print_fn)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:  # fixed shapes: one compiled program for every batch
      chunk = np.concatenate([chunk, np.zeros((batch_size - n, chunk.shape[1]), np.int32)])
    if method == 'greedy':
      res = decode.greedy(dparams, cfg, jnp.asarray(chunk), max_decode_length)
    else:
      res = decode.beam_search(dparams, cfg, jnp.asarray(chunk), max_decode_length,
                               num_beams=num_beams, alpha=alpha)
    tokens = np.asarray(jax.device_get(res.tokens))[:n]
    for row in tokens:
      row = row.tolist()
      if tokenizer.eos_id in row:
        row = row[:row.index(tokenizer.eos_id)]
      out.append(tokenizer.decode(row))
    progress.update(len(out))
  return out


@functools.partial(jax.jit, static_argnames=('cfg',))
def _sequence_logprobs(params, batch, cfg: ModelConfig):
  """[B] sum over weighted target tokens of log p(token), teacher-forced."""
  logits_BTV = step_lib.apply_model(build_model(cfg), params, batch, deterministic=True)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  tok_logp_BT = jnp.take_along_axis(logp_BTV, batch['decoder_target_tokens'][..., None],
                                    axis=-1)[..., 0]
  return jnp.sum(tok_logp_BT * batch['decoder_loss_weights'], axis=-1)


def score(params, cfg: ModelConfig, tokenizer, inputs: Sequence[str], targets: Sequence[str], *,
          lengths: dict[str, int], batch_size: int = 32,
          print_fn: Callable[[str], None] | None = None) -> np.ndarray:
  """log p(target + EOS | input) of each (input, target) pair: float64 [N]."""
  if len(inputs) != len(targets):
    raise TaskError(f'{len(inputs)} inputs for {len(targets)} targets; they must pair up')
  arch = 'encdec' if cfg.is_encdec else 'decoder'
  ins = tokenizer.encode_batch(list(inputs))
  tgts = tokenizer.encode_batch(list(targets))
  rows, cut = [], 0
  for a, b in zip(ins, tgts):
    ids_in, ids_tgt, (ci, ct) = task_pipeline.fit_ids(a, b, lengths, arch, 'truncate')
    cut += ci or ct
    rows.append(packing.pack_examples(
        [objectives.example_features(np.asarray(ids_in), np.asarray(ids_tgt), arch)],
        lengths, pack=False)[0])
  if cut:
    log.warning('score: %d of %d examples were cut to fit %s', cut, len(rows), lengths)
  out = np.zeros(len(rows), np.float64)
  progress = Progress('scoring', len(rows), print_fn)
  empty = packing.empty_row(lengths, arch)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    n = len(chunk)
    batch = packing.stack_rows(chunk + [empty] * (batch_size - n))
    res = _sequence_logprobs(params, {k: jnp.asarray(v) for k, v in batch.items()}, cfg)
    out[start:start + n] = np.asarray(jax.device_get(res))[:n]
    progress.update(start + n)
  return out


def rank_classify(params, cfg: ModelConfig, tokenizer, inputs: Sequence[str],
                  labels: Sequence[str], *, lengths: dict[str, int], batch_size: int = 32,
                  print_fn=None) -> tuple[list[str], np.ndarray]:
  """(the label of highest log-likelihood for each input, scores [N, L]) (T5X's rank mode)."""
  if not labels:
    raise TaskError('rank classification needs the task\'s labels; this task lists none')
  pairs_in = [x for x in inputs for _ in labels]
  pairs_tgt = [lab for _ in inputs for lab in labels]
  scores_NL = score(params, cfg, tokenizer, pairs_in, pairs_tgt, lengths=lengths,
                    batch_size=batch_size, print_fn=print_fn).reshape(len(inputs), len(labels))
  return [labels[i] for i in np.argmax(scores_NL, axis=1)], scores_NL


def evaluate_task(params, cfg: ModelConfig, tokenizer, task: Task, split: str, *,
                  lengths: dict[str, int], batch_size: int = 32, method: str = 'greedy',
                  num_beams: int = 4, alpha: float = 0.6, max_examples: int = 0,
                  max_decode_length: int = 0, rank_classification: bool = False,
                  confidence: bool = False, n_bootstrap: int = 1000,
                  baselines: bool = True, print_fn=None) -> dict[str, Any]:
  """Decodes `split` of `task`, postprocesses, scores with the task's metrics.

  Returns {'task', 'split', 'examples', 'metrics': {name: score}, 'confidence' (when asked),
  'rank_metrics' (rank classification, when asked), 'baselines': {'copy' or 'majority': metrics},
  'predictions': [{'input', 'target', 'prediction', **meta}]}.
  """
  examples = task.examples(split)
  if max_examples:
    examples = examples[:max_examples]
  T = max_decode_length or lengths['decoder']
  S = lengths.get('encoder', lengths['decoder'])
  preds = generate(params, cfg, tokenizer, [e.input for e in examples], max_input_length=S,
                   max_decode_length=T, batch_size=batch_size, method=method,
                   num_beams=num_beams, alpha=alpha, print_fn=print_fn)
  preds = [task.postprocess_text(p) for p in preds]
  refs = [task.postprocess_text(e.target) for e in examples]
  out: dict[str, Any] = {'task': task.name, 'split': split, 'examples': len(examples),
                         'decode': method, 'metrics': metrics_lib.compute(task.metrics, preds, refs)}
  if confidence:
    out['confidence'] = metrics_lib.with_confidence(task.metrics, preds, refs, n_bootstrap)
  records = [{'input': e.meta.get('raw_input', e.input), 'target': e.target, 'prediction': p,
              **{k: v for k, v in e.meta.items() if k != 'raw_input'}}
             for e, p in zip(examples, preds)]
  if rank_classification:
    ranked, _ = rank_classify(params, cfg, tokenizer, [e.input for e in examples], task.labels,
                              lengths=lengths, batch_size=batch_size, print_fn=print_fn)
    out['rank_metrics'] = metrics_lib.compute(task.metrics, ranked, refs)
    for r, lab in zip(records, ranked):
      r['rank_prediction'] = lab
  if baselines:
    if task.labels:
      train_targets = [task.postprocess_text(e.target) for e in task.examples('train')]
      base = metrics_lib.majority_baseline(train_targets, len(refs))
      out['baselines'] = {'majority': metrics_lib.compute(task.metrics, base, refs)}
    else:
      base = [task.postprocess_text(e.meta.get('raw_input', e.input)) for e in examples]
      out['baselines'] = {'copy': metrics_lib.compute(task.metrics, base, refs)}
  out['predictions'] = records
  return out


def saved_settings(path: str) -> dict[str, Any]:
  """The data lengths and task files a t5like workdir was trained with ({} for other folders)."""
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.isdir(os.path.join(path, 'checkpoints')) or not os.path.isfile(cfg_path):
    return {}
  with open(cfg_path) as f:
    saved = json.load(f)
  data, task = saved.get('data', {}), saved.get('task', {}) or {}
  return {'inputs_length': data.get('inputs_length'),
          'targets_length': data.get('targets_length') or data.get('inputs_length'),
          'task_files': list(task.get('files', ())), 'task': task.get('name', '')}


def read_jsonl(path: str, required: Sequence[str]) -> list[dict]:
  """Records of a JSONL file, each checked to hold string `required` fields."""
  if not os.path.isfile(path):
    raise TaskError(f'input file {path!r} does not exist')
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f'{path}:{n} is not valid JSON ({e.msg})') from None
      if not isinstance(rec, dict):
        raise TaskError(f'{path}:{n} is not a JSON object')
      for field in required:
        if not isinstance(rec.get(field), str):
          raise TaskError(f'{path}:{n} has no string field {field!r} (found {sorted(rec)})')
      out.append(rec)
  if not out:
    raise TaskError(f'input file {path!r} is empty; it needs one JSON object a line')
  return out


def write_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  os.replace(tmp, path)
