"""Data: corpus, tokenizer, objectives, augmentation and the grain input pipeline.

The trainer's entry point (see `t5like.data.pipeline` for the full contract):

  from t5like.data import make_datasets, to_global_batch, sequence_lengths
  train_iter, eval_batches, tokenizer = make_datasets(data_cfg, model_arch, workdir, seed=seed)
  batch = to_global_batch(next(train_iter), mesh)          # dict of global jax.Arrays
  state = train_iter.get_state(); train_iter.set_state(state)   # JSON-able position
  for batch in eval_batches(): ...                          # finite, deterministic

- `data_cfg`: t5like.config.DataConfig; `model_arch`: 'encdec' or 'decoder'.
- Batches are dicts of numpy arrays [per-process batch, length] with the T5X keys
  encoder_input_tokens / encoder_segment_ids / encoder_positions (encdec only) and
  decoder_input_tokens / decoder_target_tokens / decoder_segment_ids / decoder_positions /
  decoder_loss_weights; lengths from `sequence_lengths(data_cfg, model_arch)`.
- The model's vocabulary size is `tokenizer.model_vocab_size` (pieces + 100 sentinels, rounded up
  to a multiple of 128: 8,192 for the default 8,000 pieces).
"""
from t5like.data.corpus import CorpusError, Document, load_documents, split_documents
from t5like.data.objectives import DECODER_KEYS, ENCDEC_KEYS, ObjectiveError
from t5like.data.pipeline import (PipelineError, RowSlotIterator, make_datasets,
                                  sequence_lengths, to_global_batch)
from t5like.data.tokenizer import Tokenizer, TokenizerError

__all__ = ['CorpusError', 'Document', 'load_documents', 'split_documents', 'DECODER_KEYS',
           'ENCDEC_KEYS', 'ObjectiveError', 'PipelineError', 'RowSlotIterator', 'make_datasets',
           'sequence_lengths', 'to_global_batch', 'Tokenizer', 'TokenizerError']
