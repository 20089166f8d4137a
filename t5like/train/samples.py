"""Sampled continuations of held-out text, to see what a trained model has learnt.

The prompt is laid out the way the model was trained to read it:
- encoder-decoder, 'prefix_lm': prompt + EOS in the encoder; the decoder writes the continuation;
- encoder-decoder, 'span_corruption': prompt + `<extra_id_0>` + EOS (T5's fill-in-the-blank
  continuation); the decoder writes `<extra_id_0> span <extra_id_1>`, and the span is returned;
- decoder-only: the prompt (+ EOS for 'prefix_lm', whose streams are prefix + EOS + rest).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5like.config import DataConfig, ModelConfig
from t5like.data import corpus as corpus_lib
from t5like.infer import decode


def held_out_prompts(docs: Sequence[corpus_lib.Document], num: int, words: int = 12) -> list[str]:
  """`num` prompts of about `words` words, from the middle of successive held-out documents."""
  prompts = []
  for i in range(num):
    doc = docs[i % len(docs)]
    lines = [l.strip() for l in doc.text.splitlines() if len(l.split()) >= 4]
    if not lines:
      continue
    start = (len(lines) // 2 + 7 * (i // len(docs))) % len(lines)
    text = []
    for line in lines[start:] + lines[:start]:
      text.extend(line.split())
      if len(text) >= words:
        break
    prompts.append(' '.join(text[:words]))
  return prompts


def prompt_ids(tokenizer, prompt: str, objective: str, model_cfg: ModelConfig) -> list[int]:
  ids = tokenizer.encode(prompt)
  if model_cfg.is_encdec:
    if objective == 'span_corruption':
      return ids + [tokenizer.sentinel_id(0), tokenizer.eos_id]
    return ids + [tokenizer.eos_id]
  return ids + ([tokenizer.eos_id] if objective == 'prefix_lm' else [])


def continuation_text(tokenizer, ids: Sequence[int], objective: str, model_cfg: ModelConfig) -> str:
  ids = [int(t) for t in ids]
  if model_cfg.is_encdec and objective == 'span_corruption':
    if ids and ids[0] == tokenizer.sentinel_id(0):
      ids = ids[1:]
    for k, t in enumerate(ids):   # the span ends at the next sentinel
      if tokenizer.is_sentinel(t):
        ids = ids[:k]
        break
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def sample_continuations(params, model_cfg: ModelConfig, data_cfg: DataConfig, tokenizer,
                         prompts: Sequence[str], *, max_new_tokens: int, seed: int = 0,
                         temperature: float = 0.8, top_k: int = 40) -> list[tuple[str, str]]:
  """[(prompt, sampled continuation)] for each prompt (one batched `decode.sample` call)."""
  if not prompts:
    return []
  rows = [prompt_ids(tokenizer, p, data_cfg.objective, model_cfg) for p in prompts]
  width = max(len(r) for r in rows)
  inputs = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    inputs[i, :len(r)] = r
  out = decode.sample(params, model_cfg, jnp.asarray(inputs), max_new_tokens,
                      jax.random.key(seed), temperature=temperature, top_k=top_k)
  tokens = np.asarray(jax.device_get(out.tokens))
  return [(p, continuation_text(tokenizer, tokens[i], data_cfg.objective, model_cfg))
          for i, p in enumerate(prompts)]
