"""Autoregressive decoding with the KV cache inside one jitted `lax.while_loop`.

  greedy(params, cfg, inputs, max_new_tokens)                 -> Decoded
  sample(params, cfg, inputs, max_new_tokens, rng, temperature=1.0, top_k=0, top_p=1.0)
  beam_search(params, cfg, encoder_tokens, max_new_tokens, num_beams=4, alpha=0.6)

Each takes `backend` ('auto', 'xla', 'cpu_kernels'; t5like/infer/backend.py): how the prefill and
the steps run here. `params` may be in the training layout or the backend's decoding one
(`prepare_params`, once per model: saves a copy of the decoder weights per call, and on CPU packs
them for the few-row kernel). `inputs` are encoder tokens [B, S] (0 = padding) for an
encoder-decoder model, or right-padded prompts [B, P] for a decoder-only model (each row's prompt
ends at its last non-zero token).
Every row stops at its own EOS (later positions hold 0) unless `stop_at_eos=False`; the loop ends
when all rows are done. Shape letters: B batch, K beams, S source, P prompt, T new tokens, V vocab.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from t5like.config import ModelConfig
from t5like.infer import backend as backend_lib, sampling
from t5like.infer.backend import prompt_lengths  # noqa: F401  (part of this module's API)
from t5like.infer.sampling import argmax, filter_logits, token_logprob  # noqa: F401


def prepare_params(cfg: ModelConfig, params, backend: str = 'auto'):
  """The parameters in `backend`'s decoding layout, for repeated decoding (a server does this at
  load): per-layer weights, and for the CPU kernels the step's weights packed. Idempotent."""
  return backend_lib.get_backend(backend, cfg).prepare(cfg, params)


class Decoded(NamedTuple):
  tokens: jax.Array     # [B, T] new tokens, 0 after EOS
  lengths: jax.Array    # [B] number of new tokens including the EOS
  scores: jax.Array     # [B] sum of log-probabilities (beam search: length-normalised)


def _cache_len(cfg: ModelConfig, inputs_BS, max_new_tokens: int) -> int:
  return max_new_tokens if cfg.is_encdec else inputs_BS.shape[1] + max_new_tokens


def _loop(params, cfg, inputs, max_new_tokens, select, stop_at_eos, rng, be):
  params = be.layout(cfg, params)
  cache, logits_BV = be.prefill(params, cfg, inputs, _cache_len(cfg, inputs, max_new_tokens))
  B = inputs.shape[0]

  def emit(i, logits_BV, out_BT, done_B, lengths_B, score_B):
    """Chooses token i of every row from its logits and records it (0 once a row is done)."""
    tok_B, logp_B = select(logits_BV, jax.random.fold_in(rng, i))
    tok_B = jnp.where(done_B, 0, tok_B)
    score_B = score_B + jnp.where(done_B, 0.0, logp_B)
    lengths_B = lengths_B + (~done_B).astype(jnp.int32)
    out_BT = jax.lax.dynamic_update_slice_in_dim(out_BT, tok_B[:, None], i, axis=1)
    if stop_at_eos:
      done_B = done_B | (tok_B == cfg.eos_id)
    return tok_B, out_BT, done_B, lengths_B, score_B

  # The loop emits tokens 0..T-2, each followed by a decoding step; the last token is emitted
  # after it. No conditional inside the body, so XLA can hoist loop-invariant weight slices.
  def cond(state):
    i, _, _, _, done_B, _, _ = state
    return (i < max_new_tokens - 1) & ~jnp.all(done_B)

  def body(state):
    i, cache, logits_BV, out_BT, done_B, lengths_B, score_B = state
    tok_B, out_BT, done_B, lengths_B, score_B = emit(i, logits_BV, out_BT, done_B, lengths_B,
                                                     score_B)
    logits_BV, cache = be.step(params, cfg, tok_B, cache)
    return i + 1, cache, logits_BV, out_BT, done_B, lengths_B, score_B

  state = (jnp.int32(0), cache, logits_BV, jnp.zeros((B, max_new_tokens), jnp.int32),
           jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.float32))
  i, _, logits_BV, out_BT, done_B, lengths_B, score_B = jax.lax.while_loop(cond, body, state)
  _, out_BT, _, lengths_B, score_B = emit(i, logits_BV, out_BT, done_B, lengths_B, score_B)
  return Decoded(out_BT, lengths_B, score_B)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'stop_at_eos', 'backend'))
def greedy(params, cfg: ModelConfig, inputs, max_new_tokens: int, stop_at_eos: bool = True,
           backend: str = 'auto'):
  be = backend_lib.get_backend(backend, cfg)
  select = lambda logits_BV, _: be.pick(logits_BV)
  return _loop(params, cfg, inputs, max_new_tokens, select, stop_at_eos, jax.random.key(0), be)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'stop_at_eos', 'backend'))
def sample(params, cfg: ModelConfig, inputs, max_new_tokens: int, rng, temperature=1.0,
           top_k=0, top_p=1.0, stop_at_eos: bool = True, backend: str = 'auto'):
  """Temperature / top-k / top-p sampling (t5like/infer/sampling.py); temperature 0 is greedy."""
  B = inputs.shape[0]

  def select(logits_BV, key):
    tok_B = sampling.sample(logits_BV, jax.random.split(key, B), temperature, top_k, top_p)
    return tok_B, token_logprob(logits_BV, tok_B)
  return _loop(params, cfg, inputs, max_new_tokens, select, stop_at_eos, rng,
               backend_lib.get_backend(backend, cfg))


def _length_penalty(length, alpha):
  """GNMT / T5X brevity penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree, beam_idx_BK, batch: int, beams: int):
  """Reorders the beams of every [B*K, ...] leaf (cache K/V keep batch on axis 1)."""
  flat = (jnp.arange(batch)[:, None] * beams + beam_idx_BK).reshape(-1)

  def gather(x):
    axis = 1 if x.ndim == 5 else 0
    return jnp.take(x, flat, axis=axis)
  return jax.tree.map(gather, tree)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'num_beams', 'stop_at_eos',
                                             'backend'))
def beam_search(params, cfg: ModelConfig, encoder_tokens, max_new_tokens: int,
                num_beams: int = 4, alpha=0.6, stop_at_eos: bool = True, backend: str = 'auto'):
  """Beam search for encoder-decoder models; returns the best finished beam of each row.

  Scores are log-probabilities divided by the length penalty ((5 + len) / 6) ** alpha. A beam
  ends at EOS; the search stops once no live beam can beat the worst kept finished one.
  """
  if not cfg.is_encdec:
    raise ValueError('beam_search supports encoder-decoder models; use greedy or sample for '
                     f'decoder-only model {cfg.name!r}')
  B, K, T = encoder_tokens.shape[0], num_beams, max_new_tokens
  be = backend_lib.get_backend(backend, cfg)
  params = be.layout(cfg, params)
  cache, logits_BV = be.prefill(params, cfg, jnp.repeat(encoder_tokens, K, axis=0), T)
  neg_inf = jnp.float32(-1e9)
  # Only the first beam is live at the start, so the K initial copies don't duplicate results.
  alive_logp_BK = jnp.tile(jnp.array([0.0] + [-1e9] * (K - 1), jnp.float32), (B, 1))
  state = dict(
      i=jnp.int32(0), cache=cache, logits=logits_BV,
      alive_seq=jnp.zeros((B, K, T), jnp.int32), alive_logp=alive_logp_BK,
      fin_seq=jnp.zeros((B, K, T), jnp.int32), fin_score=jnp.full((B, K), neg_inf),
      fin_len=jnp.zeros((B, K), jnp.int32))

  def cond(s):
    best_possible_B = s['alive_logp'][:, 0] / _length_penalty(T, alpha)
    worst_fin_B = jnp.min(s['fin_score'], axis=1)
    all_settled = jnp.all(worst_fin_B > best_possible_B) if stop_at_eos else jnp.bool_(False)
    return (s['i'] < T) & ~all_settled

  def body(s):
    i = s['i']
    logp_BKV = jax.nn.log_softmax(s['logits']).reshape(B, K, -1)
    V = logp_BKV.shape[-1]
    cand_BKV = s['alive_logp'][:, :, None] + logp_BKV
    top_logp_B2K, top_idx_B2K = jax.lax.top_k(cand_BKV.reshape(B, K * V), 2 * K)
    beam_B2K, tok_B2K = top_idx_B2K // V, (top_idx_B2K % V).astype(jnp.int32)
    seq_B2KT = jnp.take_along_axis(s['alive_seq'], beam_B2K[:, :, None], axis=1)
    seq_B2KT = jax.lax.dynamic_update_slice_in_dim(seq_B2KT, tok_B2K[:, :, None], i, axis=2)
    is_eos = (tok_B2K == cfg.eos_id) if stop_at_eos else jnp.zeros_like(tok_B2K, bool)
    # Live beams: the best K candidates that did not just end.
    live_logp = jnp.where(is_eos, neg_inf, top_logp_B2K)
    alive_logp_BK, keep_BK = jax.lax.top_k(live_logp, K)
    alive_seq = jnp.take_along_axis(seq_B2KT, keep_BK[:, :, None], axis=1)
    src_beam_BK = jnp.take_along_axis(beam_B2K, keep_BK, axis=1)
    alive_tok = jnp.take_along_axis(tok_B2K, keep_BK, axis=1)
    # Finished beams: merge candidates that just ended with those kept so far.
    fin_cand = jnp.where(is_eos, top_logp_B2K / _length_penalty(i + 1, alpha), neg_inf)
    all_score = jnp.concatenate([s['fin_score'], fin_cand], axis=1)
    all_seq = jnp.concatenate([s['fin_seq'], seq_B2KT], axis=1)
    all_len = jnp.concatenate([s['fin_len'], jnp.full_like(tok_B2K, i + 1)], axis=1)
    fin_score, fin_idx = jax.lax.top_k(all_score, K)
    fin_seq = jnp.take_along_axis(all_seq, fin_idx[:, :, None], axis=1)
    fin_len = jnp.take_along_axis(all_len, fin_idx, axis=1)
    cache = _gather_beams(s['cache'], src_beam_BK, B, K)
    logits, cache = jax.lax.cond(i + 1 < T,
                                 lambda c: be.step(params, cfg, alive_tok.reshape(-1), c),
                                 lambda c: (s['logits'], c), cache)
    return dict(i=i + 1, cache=cache, logits=logits, alive_seq=alive_seq,
                alive_logp=alive_logp_BK, fin_seq=fin_seq, fin_score=fin_score, fin_len=fin_len)

  s = jax.lax.while_loop(cond, body, state)
  # Rows with no finished beam fall back to their best live beam.
  has_fin_B = s['fin_score'][:, 0] > neg_inf / 2
  alive_score_B = s['alive_logp'][:, 0] / _length_penalty(s['i'], alpha)
  tokens = jnp.where(has_fin_B[:, None], s['fin_seq'][:, 0], s['alive_seq'][:, 0])
  lengths = jnp.where(has_fin_B, s['fin_len'][:, 0], s['i'])
  scores = jnp.where(has_fin_B, s['fin_score'][:, 0], alive_score_B)
  return Decoded(tokens, lengths, scores)
