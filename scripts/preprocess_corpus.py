#!/usr/bin/env python
"""Cuts an experiment's corpus into ArrayRecord token chunks, streaming one document at a time.

  python scripts/preprocess_corpus.py --config=experiments/configs/shakespeare.py \
      [--config.data.corpus=/data/big_corpus] --out=/data/big_corpus_records
  python experiments/main.py --config=experiments/configs/shakespeare.py \
      --config.data.corpus=/data/big_corpus_records

The chunks are the ones the in-memory pipeline would make for that config (same split, same
tokenisation, same chunk length; t5like.data.pipeline.make_chunks per document), written as
records (t5like/data/records.py describes the folder). Memory stays bounded by one document plus
the tokenizer's training sample: the document names are listed first and split, then the texts
are read one at a time, twice (a reservoir sample of `data.tokenizer_max_sentences` training lines
for the tokenizer, unless `data.tokenizer` names one; then the chunks). When the corpus has no more
training lines than that, the sample is all of them, in order, and the tokenizer is the one the
in-memory pipeline trains. Prints a JSON summary.
"""
from __future__ import annotations

import json
import resource
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags


_CONFIG = config_flags.DEFINE_config_file('config', None, 'experiment config file[:arg]',
                                          lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'folder to write (created; must not hold records yet)')
flags.mark_flags_as_required(['config', 'out'])


def reservoir_lines(docs, capacity: int, seed: int) -> list[str]:
  """Up to `capacity` non-empty lines drawn uniformly from the stream (all, in order, when fewer)."""
  rng = np.random.default_rng(seed)
  kept: list[tuple[int, str]] = []
  n = 0
  for doc in docs:
    for line in doc.text.splitlines():
      line = line.strip()
      if not line:
        continue
      if len(kept) < capacity:
        kept.append((n, line))
      else:
        j = int(rng.integers(0, n + 1))
        if j < capacity:
          kept[j] = (n, line)
      n += 1
  return [line for _, line in sorted(kept)]


def preprocess(cfg, out: str) -> dict:
  from t5like import paths
  from t5like.data import corpus as corpus_lib, objectives, pipeline, records
  from t5like.data import tokenizer as tokenizer_lib
  t0 = time.perf_counter()
  data = cfg.data
  lengths = pipeline.sequence_lengths(data, cfg.model.arch)
  chunk_length = objectives.chunk_length(data.objective, cfg.model.arch, lengths,
                                         data.noise_density, data.mean_noise_span_length)
  folder = paths.resolve(out)
  if (folder / records.META_FILE).exists():
    raise SystemExit(f'{out} already holds records ({records.META_FILE}); choose another --out')
  folder.mkdir(parents=True, exist_ok=True)
  stream = lambda: corpus_lib.stream_documents(data.corpus, text_field=data.text_field,
                                               on_bad_file=data.on_bad_file)
  names, _ = stream()
  val_names = corpus_lib.validation_names(names, data.validation_fraction, data.split_seed)

  if data.tokenizer:
    tok = tokenizer_lib.Tokenizer.from_file(data.tokenizer)
  else:
    lines = reservoir_lines((d for d in stream()[1] if d.name not in val_names),
                            data.tokenizer_max_sentences, data.split_seed)
    tok = tokenizer_lib.train_tokenizer([corpus_lib.Document('sample', '\n'.join(lines))],
                                        data.vocab_size, max_sentences=len(lines) or 1,
                                        seed=data.split_seed)
  paths.write_atomic(folder / records.TOKENIZER_FILE, tok.model_proto)

  val_docs = []
  counts = {'train_documents': 0, 'validation_documents': 0}

  def train_chunks():
    for doc in stream()[1]:
      if doc.name in val_names:
        val_docs.append(doc)
        counts['validation_documents'] += 1
        continue
      counts['train_documents'] += 1
      yield from pipeline.make_chunks([doc], tok, chunk_length)

  n_train = records.write_chunks(paths.as_str(folder / records.TRAIN_FILE), train_chunks())
  n_val = records.write_chunks(paths.as_str(folder / records.VALIDATION_FILE),
                               pipeline.make_chunks(val_docs, tok, chunk_length))
  if not n_train or not n_val:
    raise SystemExit(f'the corpus gave {n_train} training and {n_val} validation chunks; it is '
                     'too small for a split')
  paths.write_atomic(folder / records.VALIDATION_DOCS, ''.join(
      json.dumps({'name': d.name, 'text': d.text}) + '\n' for d in val_docs))
  meta = {'format': records.FORMAT, 'chunk_length': chunk_length, 'num_train_chunks': n_train,
          'num_validation_chunks': n_val, **counts, 'source_corpus': data.corpus,
          'objective': data.objective, 'lengths': lengths, 'vocab_size': tok.vocab_size,
          'validation_fraction': data.validation_fraction, 'split_seed': data.split_seed}
  paths.write_atomic(folder / records.META_FILE, json.dumps(meta, indent=1, sort_keys=True))
  return {**meta, 'out': out, 'seconds': round(time.perf_counter() - t0, 1),
          'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from t5like import config as config_lib
  cfg = config_lib.from_dict(config_lib.TrainConfig, _CONFIG.value.to_dict())
  print(json.dumps(preprocess(cfg, _OUT.value), sort_keys=True))


if __name__ == '__main__':
  app.run(main)
