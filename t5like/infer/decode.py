"""Autoregressive decoding with the KV cache inside one jitted `lax.while_loop`.

  greedy(params, cfg, inputs, max_new_tokens)                 -> Decoded
  sample(params, cfg, inputs, max_new_tokens, rng, temperature=1.0, top_k=0, top_p=1.0)
  beam_search(params, cfg, encoder_tokens, max_new_tokens, num_beams=4, alpha=0.6)

`params` may be in the training layout or the decoding one (`prepare_params`, once per model: saves
a copy of the decoder weights per call, and on CPU packs them for the few-row kernel). `inputs` are
encoder tokens [B, S] (0 = padding) for an encoder-decoder model, or right-padded prompts [B, P]
for a decoder-only model (each row's prompt ends at its last non-zero token).
Every row stops at its own EOS (later positions hold 0) unless `stop_at_eos=False`; the loop ends
when all rows are done. Shape letters: B batch, K beams, S source, P prompt, T new tokens, V vocab.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5like import precision
from t5like.config import ModelConfig
from t5like.kernels import cpu_matmul, token_pick
from t5like.models import build_model, init_cache
from t5like.models.transformer import unroll_for_decoding, unroll_params


def prepare_params(cfg: ModelConfig, params, pack: bool | None = None):
  """The parameters in the decoding layout, for repeated decoding (a server does this at load).

  The decoder's and encoder's layer weights are split per layer (`unroll_params`: every function
  here accepts either layout, but one given the training layout splits it, a copy, on each call).
  On a CPU, the weights a decoding step multiplies by are also packed into panels for the few-row
  kernel of `t5like.kernels.cpu_matmul` (`pack=None`: when it is built and the model runs in
  float32 with unquantised weights; the decoder's other weights and the encoder stay as they
  are). Idempotent.
  """
  params = unroll_params(cfg, params, encoder=True)   # eager: stacks copied, the rest shared
  if pack is None:
    pack = (precision.get_policy(cfg.precision).compute_dtype == jnp.float32
            and cfg.weight_quant == 'none' and cfg.qat == 'none' and cfg.activation_quant == 'none'
            and cpu_matmul.available())
  return pack_step_weights(cfg, params) if pack else params


# Projections a decoding step applies to its one new token, by parent module name, with the number
# of leading kernel dims each contracts. Cross-attention keys and values are applied once, to the
# encoder output, and stay unpacked.
_STEP_PROJECTIONS = {'query': 1, 'key': 1, 'value': 1, 'out': 2, 'wi': 1, 'wi_0': 1, 'wi_1': 1,
                     'wo': 1, 'lm_head': 1}


def pack_step_weights(cfg: ModelConfig, params):
  """`params` with the decoder's per-step projection kernels and its output layer (a tied
  embedding, or lm_head) packed (`cpu_matmul.PackedKernel`) where `cpu_matmul.packable`."""
  def visit(tree, path):
    out = {}
    for name, sub in tree.items():
      here = path + (name,)
      if isinstance(sub, dict):
        out[name] = visit(sub, here)
      elif name == 'kernel' and path[-1] in _STEP_PROJECTIONS and cpu_matmul.packable(sub):
        once = len(path) > 1 and path[-2] == 'cross_attention' and path[-1] in ('key', 'value')
        dims = _STEP_PROJECTIONS[path[-1]]
        columns = int(np.prod(sub.shape[dims:]))
        out[name] = sub if once or columns % cpu_matmul.PANEL else cpu_matmul.pack(sub, dims)
      elif (name == 'embedding' and path == ('shared_embedding',) and cfg.tie_embeddings
            and cpu_matmul.packable(sub) and sub.shape[0] % cpu_matmul.PANEL == 0):
        out[name] = cpu_matmul.pack(sub, transposed=True)
      else:
        out[name] = sub
    return out
  params = dict(params)
  if 'decoder' in params:
    params['decoder'] = visit(params['decoder'], ('decoder',))
  if 'shared_embedding' in params:
    params['shared_embedding'] = visit(params['shared_embedding'], ('shared_embedding',))
  return jax.block_until_ready(params)


class Decoded(NamedTuple):
  tokens: jax.Array     # [B, T] new tokens, 0 after EOS
  lengths: jax.Array    # [B] number of new tokens including the EOS
  scores: jax.Array     # [B] sum of log-probabilities (beam search: length-normalised)


def _prefill(params, cfg: ModelConfig, inputs_BS, max_new_tokens: int, batch_repeat: int = 1):
  """Cache holding the prompt (or encoder output) and the logits [B, V] of the first new token."""
  model = build_model(cfg)
  if batch_repeat > 1:
    inputs_BS = jnp.repeat(inputs_BS, batch_repeat, axis=0)
  B, S = inputs_BS.shape
  if cfg.is_encdec:
    cache = init_cache(cfg, B, max_new_tokens, S)
    with cpu_matmul.enabled():   # the encoder's attention
      cache = model.apply({'params': params}, inputs_BS, cache, method='prefill')
    start_B1 = jnp.full((B, 1), cfg.decoder_start_id, jnp.int32)
    logits_BV, cache = _step(params, cfg, start_B1[:, 0], cache)
    return cache, logits_BV
  lengths_B = prompt_lengths(inputs_BS)
  cache = init_cache(cfg, B, S + max_new_tokens)
  with cpu_matmul.enabled():   # short prompts: few rows
    logits_BSV, cache = model.apply({'params': params}, inputs_BS, cache, method='decode_step')
  last_BV = jnp.take_along_axis(logits_BSV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  # Rows continue right after their own prompt; stale entries beyond it are masked until rewritten.
  return dict(cache, index=lengths_B), last_BV


def prompt_lengths(prompts_BP):
  """Length of each right-padded prompt (position of the last non-zero token + 1, at least 1)."""
  P = prompts_BP.shape[1]
  nonzero = prompts_BP != 0
  last = P - jnp.argmax(nonzero[:, ::-1], axis=1)
  return jnp.where(nonzero.any(axis=1), last, 1).astype(jnp.int32)


def argmax(logits_BV):
  """jnp.argmax over the last axis (lowest index on ties) as two plain reductions.

  XLA:CPU runs the (value, index) pair reduction of jnp.argmax about 8x slower than a max; this
  is a max, then the smallest index holding it. Rows with NaN give index 0.
  """
  if token_pick.wanted(logits_BV):   # inside a decoding loop on CPU: one fused pass
    return token_pick.greedy(logits_BV)[0]
  V = logits_BV.shape[-1]
  top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, logits_BV.ndim - 1)
  idx_B = jnp.min(jnp.where(logits_BV == top_B1, iota, V), axis=-1)
  return jnp.where(idx_B == V, 0, idx_B).astype(jnp.int32)


def greedy_pick(logits_BV):
  """(argmax token [B], its log-probability [B]); on CPU inside a decoding loop, one kernel."""
  with cpu_matmul.enabled():
    if token_pick.wanted(logits_BV):
      return token_pick.greedy(logits_BV)
  tok_B = argmax(logits_BV)
  return tok_B, token_logprob(logits_BV, tok_B)


def token_logprob(logits_BV, tok_B):
  """log_softmax(logits)[tok] without materialising the [B, V] log-probabilities."""
  picked_B = jnp.take_along_axis(logits_BV, tok_B[:, None], axis=1)[:, 0]
  return picked_B - jax.nn.logsumexp(logits_BV, axis=-1)


def _step(params, cfg, tokens_B, cache):
  with cpu_matmul.enabled():   # one token per row: projections stream weights
    logits_B1V, cache = build_model(cfg).apply({'params': params}, tokens_B[:, None], cache,
                                               method='decode_step')
  return logits_B1V[:, 0], cache


def filter_logits(logits_BV, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
  logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  neg_inf = jnp.finfo(logits_BV.dtype).min
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
  keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
  cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  nucleus_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  return jnp.where(top_p >= 1.0, logits_BV, nucleus_BV)


def _loop(params, cfg, inputs, max_new_tokens, select, stop_at_eos, rng):
  params = unroll_params(cfg, params)
  cache, logits_BV = _prefill(params, cfg, inputs, max_new_tokens)
  params, cache = unroll_for_decoding(cfg, params, cache)
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
    logits_BV, cache = _step(params, cfg, tok_B, cache)
    return i + 1, cache, logits_BV, out_BT, done_B, lengths_B, score_B

  state = (jnp.int32(0), cache, logits_BV, jnp.zeros((B, max_new_tokens), jnp.int32),
           jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.float32))
  i, _, logits_BV, out_BT, done_B, lengths_B, score_B = jax.lax.while_loop(cond, body, state)
  _, out_BT, _, lengths_B, score_B = emit(i, logits_BV, out_BT, done_B, lengths_B, score_B)
  return Decoded(out_BT, lengths_B, score_B)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'stop_at_eos'))
def greedy(params, cfg: ModelConfig, inputs, max_new_tokens: int, stop_at_eos: bool = True):
  select = lambda logits_BV, _: greedy_pick(logits_BV)
  return _loop(params, cfg, inputs, max_new_tokens, select, stop_at_eos, jax.random.key(0))


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'top_k', 'stop_at_eos'))
def sample(params, cfg: ModelConfig, inputs, max_new_tokens: int, rng, temperature=1.0,
           top_k: int = 0, top_p=1.0, stop_at_eos: bool = True):
  """Temperature / top-k / top-p sampling; temperature 0 is greedy."""
  def select(logits_BV, key):
    filtered = filter_logits(logits_BV, temperature, top_k, top_p)
    drawn = jax.random.categorical(key, filtered, axis=-1)
    tok_B = jnp.where(temperature <= 0, argmax(logits_BV), drawn).astype(jnp.int32)
    return tok_B, token_logprob(logits_BV, tok_B)
  return _loop(params, cfg, inputs, max_new_tokens, select, stop_at_eos, rng)


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


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'num_beams', 'stop_at_eos'))
def beam_search(params, cfg: ModelConfig, encoder_tokens, max_new_tokens: int,
                num_beams: int = 4, alpha=0.6, stop_at_eos: bool = True):
  """Beam search for encoder-decoder models; returns the best finished beam of each row.

  Scores are log-probabilities divided by the length penalty ((5 + len) / 6) ** alpha. A beam
  ends at EOS; the search stops once no live beam can beat the worst kept finished one.
  """
  if not cfg.is_encdec:
    raise ValueError('beam_search supports encoder-decoder models; use greedy or sample for '
                     f'decoder-only model {cfg.name!r}')
  B, K, T = encoder_tokens.shape[0], num_beams, max_new_tokens
  params = unroll_params(cfg, params)
  cache, logits_BV = _prefill(params, cfg, encoder_tokens, T, batch_repeat=K)
  params, cache = unroll_for_decoding(cfg, params, cache)
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
    logits, cache = jax.lax.cond(i + 1 < T, lambda c: _step(params, cfg, alive_tok.reshape(-1), c),
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
