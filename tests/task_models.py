"""A tiny random-weight T5 saved as a t5like workdir, bundle and HF folder (task / eval tests)."""
import json
import os

import jax

from t5like import config as config_lib
from t5like.data import corpus
from t5like.data import tokenizer as tokenizer_lib
from t5like.models.random_weights import random_params
from t5like.train import checkpoint as ckpt_lib

VOCAB = 600


def tiny_tokenizer():
  docs = [d for d in corpus.shakespeare_documents() if d.name in ('macbeth', 'hamlet')]
  return tokenizer_lib.train_tokenizer(docs, VOCAB)


def tiny_model(tok, seed=0, **overrides):
  cfg = config_lib.get_variant('t5_tiny', vocab_size=tok.model_vocab_size, **overrides)
  return cfg, random_params(cfg, seed=seed, embed_std=0.5, std=0.2)


def save_workdir(workdir, cfg, params, tok, steps=(1,), val_metrics=None, task=None):
  """A workdir with checkpoints at `steps` (same params), its tokenizer and config.json."""
  os.makedirs(os.path.join(workdir, 'tokenizer'), exist_ok=True)
  with open(os.path.join(workdir, 'tokenizer', 'spm_test.model'), 'wb') as f:
    f.write(tok.model_proto)
  config = config_lib.to_dict(config_lib.TrainConfig(model=cfg))
  config['data']['inputs_length'] = 32
  config['data']['targets_length'] = 24
  if task is not None:
    config['task'] = task
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False,
                               keep=len(steps), keep_best=0)
  for i, step in enumerate(steps):
    state = {'params': jax.tree.map(lambda x: x, params), 'step': step}
    ckpt.save(step, state, {}, config, val_loss=None if val_metrics is None else val_metrics[i])
  ckpt.close()
  return workdir
