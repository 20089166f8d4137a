"""A continuous-batching decode engine with fixed slots (JetStream's prefill / insert / generate).

The engine holds one preallocated KV cache of `num_slots` rows. Waiting requests are prefilled
at the smallest prompt-length bucket that fits (for encoder-decoder models that runs the encoder
and caches the cross-attention K/V), those of one bucket together in batches of the
`prefill_batch_sizes` (a burst of N requests costs a few prefill calls, not N), inserted into free
rows, and then advance one token per `generate` step together with every other live row. One
thread owns the device loop and admits new requests between steps, so a long generation never
blocks short ones. The host never waits for a prefill before dispatching the next block: each
row's next input token stays on the device (`_insert_prefilled` sets a new row's), and a
prefill's first tokens are taken after that block is queued. All shapes (each bucket's prefill at each batch size, their inserts, generate)
are compiled by `warmup()` before the engine reports ready.
Prefill, steps and sampling are decode's (t5like/infer/backend.py, sampling.py); `backend`
('auto', 'xla', 'cpu_kernels') chooses how they run here.

Shape letters: R slot rows, N requests prefilled together, P prompt bucket, S source / cache
length, V vocab.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5like.config import ModelConfig
from t5like.infer import backend as backend_lib, sampling
from t5like.models import build_model, init_cache


class EngineError(RuntimeError):
  pass


class QueueFull(EngineError):
  """The waiting queue is at capacity; retry later."""


class RequestTooLong(ValueError):
  pass


@dataclasses.dataclass
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 1.0        # 0: greedy
  top_k: int = 0                  # 0: off
  top_p: float = 1.0              # 1: off
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  logprobs: int | None = None     # None: off; N: the chosen token's logprob and the top N


_ids = itertools.count()


@dataclasses.dataclass
class Request:
  """One generation. Events reach `on_event(kind, value)` from the engine thread:
  ('tokens', [id, ...]) with its new tokens of each device call (one per decode step), then
  ('finish', reason) with reason 'stop', 'length', 'abort', 'timeout' or 'error: ...'."""
  prompt_ids: Sequence[int]
  params: SamplingParams
  on_event: Callable[[str, object], None]
  timeout_s: float | None = None
  id: int = dataclasses.field(default_factory=lambda: next(_ids))
  submitted_at: float = dataclasses.field(default_factory=time.monotonic)
  started_at: float | None = None       # prefilled into a slot
  first_token_at: float | None = None
  finished_at: float | None = None
  output_ids: list = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  cancelled: bool = False
  # With params.logprobs: one (logprob, top ids, top logprobs) per emitted token, appended before
  # its 'token' event.
  logprobs: list = dataclasses.field(default_factory=list)


def _insert_rows(slot_tree, rows_tree, slots_N):
  """Writes the N rows of a prefilled cache into the distinct rows `slots_N` (per-layer K/V and the
  rest: batch on axis 0)."""
  def put(dst, src):
    axis = 1 if dst.ndim == 5 else 0   # a stacked [L, B, ...] cache
    # Encoder K/V and mask of a shorter bucket: pad the source length (the one axis besides the
    # batch that can differ) with masked zeros.
    pad = [(0, 0) if d == axis else (0, dst.shape[d] - src.shape[d]) for d in range(src.ndim)]
    if any(hi for _, hi in pad):
      src = jnp.pad(src, pad)
    src = src.astype(dst.dtype)
    for i in range(src.shape[axis]):
      row = jax.lax.slice_in_dim(src, i, i + 1, axis=axis)
      dst = jax.lax.dynamic_update_slice_in_dim(dst, row, slots_N[i], axis=axis)
    return dst
  return jax.tree.map(put, slot_tree, rows_tree)


MAX_LOGPROBS = 20   # top-N alternatives a request may ask for per token


def logprob_info(logits_RV, tok_R):
  """(log p of each row's token [R], the top MAX_LOGPROBS ids [R, K] and their log p [R, K])."""
  logp_RV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1)
  chosen_R = jnp.take_along_axis(logp_RV, tok_R[:, None], axis=1)[:, 0]
  top_RK, ids_RK = jax.lax.top_k(logp_RV, min(MAX_LOGPROBS, logp_RV.shape[-1]))
  return chosen_R, ids_RK.astype(jnp.int32), top_RK


@functools.partial(jax.jit, static_argnames=('cfg', 'max_prompt_len', 'max_new_tokens', 'backend'))
def _prefill(params, tokens_NP, temp_N, top_k_N, top_p_N, keys_N2, *, cfg: ModelConfig,
             max_prompt_len: int, max_new_tokens: int, backend: backend_lib.XlaBackend):
  """N requests together: their cache rows, first sampled tokens [N] and `logprob_info`."""
  cache_len = max_new_tokens + 1 + (0 if cfg.is_encdec else max_prompt_len)
  rows, logits_NV = backend.prefill(params, cfg, tokens_NP, cache_len)
  toks_N = sampling.sample(logits_NV, keys_N2, temp_N, top_k_N, top_p_N)
  return rows, toks_N, logprob_info(logits_NV, toks_N)


_insert = jax.jit(_insert_rows, donate_argnums=(0,))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _insert_prefilled(cache, last_R, rows_tree, toks_N, slots_N):
  """`_insert_rows`, and each new row's first token set as its next step's input, on the device:
  the host need not wait for a prefill before dispatching the block that continues it."""
  return _insert_rows(cache, rows_tree, slots_N), last_R.at[slots_N].set(toks_N)


@functools.partial(jax.jit, static_argnames=('cfg', 'backend', 'with_logprobs', 'steps'),
                   donate_argnums=(1, 2))
def _generate(params, cache, last_R, temp_R, top_k_R, top_p_R, keys_R2, pos_R, budget_R, *,
              cfg: ModelConfig, backend: backend_lib.XlaBackend, with_logprobs: bool = False,
              steps: int = 1):
  """`steps` tokens for every slot row, each step feeding the last one's tokens back, starting from
  `last_R` (each row's last token, kept on the device): tokens [steps, R], the cache, the new
  `last_R` and (with `with_logprobs`) each step's `logprob_info` stacked the same way. A row takes
  part in the first `budget_R` steps (0: idle); outside them its cache index and last token stay
  and it counts as greedy whatever its last request asked (which path the sampler takes depends
  on the live rows only). Row r's step j draws with key fold_in(keys[r], pos[r] + j), so a block of
  steps gives the same tokens as that many single steps."""
  def step(carry, j):
    cache, tokens_R = carry
    live_R = j < budget_R
    logits_RV, new_cache = backend.step(params, cfg, tokens_R, cache)
    new_cache['index'] = jnp.where(live_R, new_cache['index'], cache['index'])
    keys = jax.vmap(jax.random.fold_in)(keys_R2, pos_R + j)
    toks = sampling.sample(logits_RV, keys, jnp.where(live_R, temp_R, 0.0), top_k_R, top_p_R)
    return (new_cache, jnp.where(live_R, toks, tokens_R)), (
        toks, logprob_info(logits_RV, toks) if with_logprobs else None)

  if steps == 1:   # no loop around a single step
    (cache, last_R), (toks, info) = step((cache, last_R), 0)
    return toks[None], cache, last_R, jax.tree.map(lambda x: x[None], info)
  (cache, last_R), (toks, info) = jax.lax.scan(step, (cache, last_R), jnp.arange(steps))
  return toks, cache, last_R, info


@functools.partial(jax.jit, static_argnames=('cfg', 'backend'))
def _score(params, inputs_1S, tokens_1T, targets_1T, *, cfg: ModelConfig,
           backend: backend_lib.XlaBackend):
  """log p(targets[t] | inputs, tokens[:t + 1]) [T], teacher-forced through the decode path: the
  encoder's prefill (encoder-decoder), then one decode step over all of `tokens` from an empty
  cache."""
  model = build_model(cfg)
  T = tokens_1T.shape[1]
  with backend.attached():
    if cfg.is_encdec:
      cache = backend.decoding_cache(init_cache(cfg, 1, T, inputs_1S.shape[1]))
      cache = model.apply({'params': params}, inputs_1S, cache, method='prefill')
    else:
      cache = backend.decoding_cache(init_cache(cfg, 1, T))
    logits_1TV, _ = model.apply({'params': params}, tokens_1T, cache, method='decode_step')
  logp_TV = jax.nn.log_softmax(logits_1TV[0].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_TV, targets_1T[0, :, None], axis=1)[:, 0]


@dataclasses.dataclass
class _Block:
  """A dispatched block of decode steps."""
  toks: jax.Array          # [steps, R]
  info: object             # logprob_info stacked [steps, R, ...], or None
  budget: np.ndarray       # [R] steps each row takes (0: idle)
  reqs: list               # each row's request when dispatched (None: idle)


@dataclasses.dataclass
class _Prefill:
  """A dispatched prefill whose first tokens the host has not taken yet."""
  toks: jax.Array          # [N]
  info: object             # logprob_info [N, ...], or None
  slots: list
  reqs: list


class Engine:
  """Serves one model. `submit` is thread-safe; `start` launches the device thread."""

  def __init__(self, params, cfg: ModelConfig, *, num_slots: int = 8,
               prompt_buckets: Sequence[int] = (32, 64, 128, 256), max_new_tokens: int = 128,
               max_queue: int = 64, name: str = 'model', backend: str = 'auto',
               prefill_batch_sizes: Sequence[int] = (1, 4, 16), decode_steps: int = 1,
               overlap: bool = True):
    if num_slots <= 0 or max_new_tokens <= 0 or max_queue <= 0 or decode_steps <= 0:
      raise ValueError('num_slots, max_new_tokens, max_queue and decode_steps must be positive')
    if not prefill_batch_sizes or any(int(n) <= 0 for n in prefill_batch_sizes):
      raise ValueError(f'prefill_batch_sizes must be positive, got {list(prefill_batch_sizes)}')
    # Batch sizes a prefill runs at (1 always, none above the slot count): waiting requests of one
    # bucket go in the largest batches that they fill, so nothing is padded.
    self.prefill_sizes = tuple(sorted({1} | {int(n) for n in prefill_batch_sizes
                                             if int(n) <= num_slots}))
    # The backend's decoding layout (per-layer decoder weights and K/V lists; on CPU, packed
    # weights): a decode step then reads each weight once, where stacked weights are sliced
    # (copied) on every call.
    self.backend = backend_lib.get_backend(backend, cfg)
    self.cfg, self.params, self.name = cfg, self.backend.prepare(cfg, params), name
    self.num_slots, self.max_new_tokens = num_slots, max_new_tokens
    # Decode steps per device call (vLLM's multi-step scheduling): the host's per-call work
    # (dispatch, bookkeeping, waking the server's loop) is paid once per block, at the cost of
    # admitting new requests and noticing cancels only between blocks.
    self.decode_steps = decode_steps
    # Overlap (vLLM's async scheduling): the next block is dispatched before the host takes the
    # last one's tokens, so device and host work at the same time. Off: one block at a time.
    self.overlap = overlap
    self.buckets = tuple(sorted(prompt_buckets))
    self.max_prompt_len = self.buckets[-1]
    self.max_queue = max_queue
    self._waiting: collections.deque[Request] = collections.deque()   # guarded by _lock
    self._slots: list[Request | None] = [None] * num_slots
    self._lock = threading.Lock()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.ready = False
    self._draining = False
    self._admitting = False
    self.steps = 0
    self.prefill_calls = self.prefilled = 0   # prefill batches run, requests they held
    self.last_error: str | None = None
    if cfg.is_encdec:
      cache = init_cache(cfg, num_slots, max_new_tokens + 1, self.max_prompt_len)
    else:
      cache = init_cache(cfg, num_slots, self.max_prompt_len + max_new_tokens + 1)
    self._cache = self.backend.decoding_cache(cache)
    self._cache_len = int(cache['self_v'].shape[3])
    R = num_slots
    self._last = jnp.zeros((R,), jnp.int32)   # each row's next input token, on the device
    self._temp = np.zeros((R,), np.float32)
    self._top_k = np.zeros((R,), np.int32)
    self._top_p = np.ones((R,), np.float32)
    self._keys = np.zeros((R, 2), np.uint32)
    self._pos = np.zeros((R,), np.int32)
    self._unseen = np.zeros((R,), np.int32)   # 1: prefilled, its first token not yet taken
    self._in_flight: _Block | None = None   # dispatched, its tokens not yet taken
    # Module-level jitted functions with static shapes: engines of the same config and sizes (two
    # versions of one model, a reloaded version) share their compiled executables.
    self._prefill = functools.partial(_prefill, cfg=cfg, max_prompt_len=self.max_prompt_len,
                                      max_new_tokens=max_new_tokens, backend=self.backend)
    self._insert = _insert_prefilled
    self._generate = functools.partial(_generate, cfg=cfg, backend=self.backend,
                                       steps=decode_steps)

  # ---- host side -------------------------------------------------------------------------------
  def bucket_for(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise RequestTooLong(f'prompt has {length} tokens; the longest this model accepts is '
                         f'{self.max_prompt_len}')

  def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
    if len(prompt_ids) == 0:
      raise ValueError('prompt is empty')
    self.bucket_for(len(prompt_ids))
    bad = [t for t in prompt_ids if not 0 <= int(t) < self.cfg.vocab_size]
    if bad:
      raise ValueError(f'prompt token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}')
    if not 1 <= params.max_tokens <= self.max_new_tokens:
      raise ValueError(f'max_tokens must be in [1, {self.max_new_tokens}], got {params.max_tokens}')
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
      raise ValueError('need temperature >= 0, 0 < top_p <= 1 and top_k >= 0')
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
      raise ValueError(f'logprobs must be in [0, {MAX_LOGPROBS}], got {params.logprobs}')

  def score(self, input_ids: Sequence[int], target_ids: Sequence[int]) -> np.ndarray:
    """log p of each target token given the input and the targets before it [len(targets)]
    (float32): the input is the encoder's (encoder-decoder) or the prompt the targets continue
    (decoder-only). Thread-safe; runs beside the device loop, not in it."""
    if len(input_ids) == 0 or len(target_ids) == 0:
      raise ValueError('scoring needs a non-empty input and non-empty targets')
    bad = [t for t in (*input_ids, *target_ids) if not 0 <= int(t) < self.cfg.vocab_size]
    if bad:
      raise ValueError(f'token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}')
    limit = self.max_prompt_len + self.max_new_tokens
    if self.cfg.is_encdec:
      inputs = np.zeros((1, self.bucket_for(len(input_ids))), np.int32)
      inputs[0, :len(input_ids)] = input_ids
      tokens, targets = [self.cfg.decoder_start_id, *target_ids[:-1]], list(target_ids)
      first = 0
    else:
      inputs = np.zeros((1, 1), np.int32)   # unused
      seq = [*input_ids, *target_ids]
      tokens, targets, first = seq[:-1], seq[1:], len(input_ids) - 1
    n = len(tokens)
    if n > limit:
      raise RequestTooLong(f'input and targets have {n + 1} tokens; at most {limit} can be scored')
    T = min(limit, max(16, 1 << (n - 1).bit_length()))   # few shapes to compile
    tok_1T, tgt_1T = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
    tok_1T[0, :n], tgt_1T[0, :n] = tokens, targets
    lp_T = _score(self.params, inputs, tok_1T, tgt_1T, cfg=self.cfg, backend=self.backend)
    return np.asarray(lp_T)[first:n]

  def submit(self, request: Request) -> None:
    self.validate(request.prompt_ids, request.params)
    with self._lock:
      if self._stop.is_set() or self._draining:
        raise EngineError(f'engine for {self.name!r} is shutting down')
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f'queue of {self.name!r} is full ({self.max_queue} waiting)')
      self._waiting.append(request)
    self._wake.set()

  def cancel(self, request: Request) -> None:
    request.cancelled = True
    self._wake.set()

  def _key_for(self, request: Request) -> np.ndarray:
    # jax.random.PRNGKey(seed)'s raw threefry key, built on the host: no device op per request.
    seed = request.params.seed if request.params.seed is not None else request.id + 1
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)

  def _sampling_arrays(self, p: SamplingParams):
    return (np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p))

  def warmup(self) -> None:
    """Compiles every prefill bucket at every prefill batch size, their inserts, and the generate
    step."""
    temp, top_k, top_p = self._sampling_arrays(SamplingParams(temperature=1.0))
    for b in self.buckets:
      for n in self.prefill_sizes:
        rows, toks, _ = self._prefill(self.params, np.ones((n, b), np.int32), np.full(n, temp),
                                      np.full(n, top_k), np.full(n, top_p),
                                      np.zeros((n, 2), np.uint32))
        self._cache, self._last = self._insert(self._cache, self._last, rows, toks,
                                               np.arange(n, dtype=np.int32))
    idle = np.zeros((self.num_slots,), np.int32)
    for with_logprobs in (False, True):   # the sampler's paths are branches of each program
      toks, self._cache, self._last, _ = self._generate(
          self.params, self._cache, self._last, self._temp, self._top_k, self._top_p, self._keys,
          self._pos, idle, with_logprobs=with_logprobs)
      np.asarray(toks)
    self._cache = jax.tree.map(jnp.zeros_like, self._cache)
    self._last = jnp.zeros_like(self._last)
    self._reset_sampling(slice(None))
    self.ready = True

  def start(self) -> None:
    if not self.ready:
      self.warmup()
    self._thread = threading.Thread(target=self._run, name=f'engine-{self.name}', daemon=True)
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def stats(self) -> dict:
    with self._lock:
      live = [r for r in self._slots if r is not None]
      waiting = len(self._waiting)
    cap = self._cache_len * self.num_slots
    used = sum(len(r.prompt_ids) * (not self.cfg.is_encdec) + len(r.output_ids) for r in live)
    return {'running': len(live), 'waiting': waiting, 'slots_in_use': len(live),
            'num_slots': self.num_slots, 'kv_cache_usage': used / cap, 'steps': self.steps,
            'prefill_calls': self.prefill_calls, 'prefilled': self.prefilled}

  def _emit(self, req: Request, kind: str, value) -> None:
    try:
      req.on_event(kind, value)
    except Exception:  # a broken consumer must not stop the device loop
      req.cancelled = True

  def _reset_sampling(self, slot) -> None:
    """An idle slot is greedy: what its last request asked for must not slow the others."""
    self._temp[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0

  def _finish(self, slot: int | None, req: Request, reason: str) -> None:
    req.finish_reason = reason
    req.finished_at = time.monotonic()
    if slot is not None:
      with self._lock:
        self._slots[slot] = None
      self._reset_sampling(slot)
      self._unseen[slot] = 0
    self._emit(req, 'finish', reason)

  def _admit(self, slots: Sequence[int], reqs: Sequence[Request], bucket: int) -> _Prefill:
    """Prefills requests of one prompt bucket together into the free rows `slots`, without
    waiting for the device: `_take_prefill` hands out their first tokens."""
    n = len(reqs)
    ids = np.zeros((n, bucket), np.int32)
    temp, top_k = np.zeros((n,), np.float32), np.zeros((n,), np.int32)
    top_p, keys = np.ones((n,), np.float32), np.zeros((n, 2), np.uint32)
    now = time.monotonic()
    for i, req in enumerate(reqs):
      ids[i, :len(req.prompt_ids)] = req.prompt_ids
      temp[i], top_k[i], top_p[i] = self._sampling_arrays(req.params)
      keys[i] = self._key_for(req)
      req.started_at = now
    rows, toks, info = self._prefill(self.params, ids, temp, top_k, top_p, keys)
    self.prefill_calls, self.prefilled = self.prefill_calls + 1, self.prefilled + n
    self._cache, self._last = self._insert(self._cache, self._last, rows, toks,
                                           np.asarray(slots, np.int32))
    for i, (slot, req) in enumerate(zip(slots, reqs)):
      with self._lock:
        self._slots[slot] = req
      self._temp[slot], self._top_k[slot], self._top_p[slot] = temp[i], top_k[i], top_p[i]
      self._keys[slot] = keys[i]
      self._pos[slot] = 1
      self._unseen[slot] = 1
    with_logprobs = any(r.params.logprobs is not None for r in reqs)
    return _Prefill(toks, info if with_logprobs else None, list(slots), list(reqs))

  def _take_prefill(self, p: _Prefill) -> None:
    """Hands a prefill's first tokens to its requests (those still in their slot)."""
    toks, info = np.asarray(p.toks).tolist(), jax.device_get(p.info)
    for i, (slot, req) in enumerate(zip(p.slots, p.reqs)):
      if self._slots[slot] is not req:   # cancelled or timed out meanwhile
        continue
      self._unseen[slot] = 0
      self._accept(slot, req, toks[i:i + 1],
                   None if info is None else tuple(x[i:i + 1] for x in info))

  def _admit_waiting(self) -> list[_Prefill]:
    """Moves waiting requests into the free slots, prefilling each bucket's in batches."""
    free = [s for s in range(self.num_slots) if self._slots[s] is None]
    with self._lock:
      taken = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
      self._admitting = bool(taken)   # neither waiting nor in a slot: a drain waits for them
    by_bucket: dict[int, list[Request]] = {}
    for req in taken:
      by_bucket.setdefault(self.bucket_for(len(req.prompt_ids)), []).append(req)
    started = []
    for bucket, reqs in by_bucket.items():
      while reqs:
        n = max(b for b in self.prefill_sizes if b <= len(reqs))
        batch, reqs = reqs[:n], reqs[n:]
        slots, free = free[:n], free[n:]
        try:
          started.append(self._admit(slots, batch, bucket))
        except Exception as e:  # a failed prefill must not take the engine down
          self.last_error = repr(e)
          for slot, req in zip(slots, batch):
            if req.finish_reason is None:
              self._finish(slot if self._slots[slot] is req else None, req, f'error: {e}')
    self._admitting = False
    return started

  def _accept(self, slot: int, req: Request, toks: Sequence[int], info=None) -> None:
    """Records a row's tokens of one device call (and their logprobs when asked for) as one
    'tokens' event, up to a stop token or max_tokens, and decides whether the request goes on.
    `info`: this row's `logprob_info`, one entry per token."""
    if req.first_token_at is None:
      req.first_token_at = time.monotonic()
    stop_ids, k = req.params.stop_token_ids, req.params.logprobs
    room = req.params.max_tokens - len(req.output_ids)
    out, reason = [], None
    for j, tok in enumerate(toks):
      if tok == self.cfg.eos_id or tok in stop_ids:
        reason = 'stop'
        break
      if k is not None and info is not None:
        lp, ids, top = (np.asarray(x[j]) for x in info)
        req.logprobs.append((float(lp), ids[:k].tolist(), top[:k].tolist()))
      out.append(tok)
      if len(out) >= room:
        reason = 'length'
        break
    if out:
      req.output_ids.extend(out)
      self._emit(req, 'tokens', out)
    if reason is not None:
      self._finish(slot, req, reason)

  @staticmethod
  def _expired(req: Request, now: float) -> bool:
    return req.timeout_s is not None and now - req.submitted_at > req.timeout_s

  def _reap(self) -> None:
    """Ends cancelled and timed-out requests, in slots and in the queue."""
    now = time.monotonic()
    for slot, req in enumerate(list(self._slots)):
      if req is None:
        continue
      if req.cancelled:
        self._finish(slot, req, 'abort')
      elif self._expired(req, now):
        self._finish(slot, req, 'timeout')
    with self._lock:
      gone = [r for r in self._waiting if r.cancelled or self._expired(r, now)]
      for r in gone:
        self._waiting.remove(r)
    for r in gone:
      self._finish(None, r, 'abort' if r.cancelled else 'timeout')

  def _next_waiting(self) -> Request | None:
    with self._lock:
      return self._waiting.popleft() if self._waiting else None

  def _dispatch(self) -> '_Block | None':
    """Starts the next block of decode steps without waiting for the one in flight: rows whose
    request ends within that one (a stop token) are computed once more and their tokens dropped.
    None when no row can step."""
    prev = self._in_flight
    budget = np.zeros((self.num_slots,), np.int32)
    for slot, req in enumerate(self._slots):
      if req is None:
        continue
      ahead = int(self._unseen[slot]) + (
          int(prev.budget[slot]) if prev is not None and prev.reqs[slot] is req else 0)
      # none past max_tokens
      budget[slot] = max(0, min(self.decode_steps,
                                req.params.max_tokens - len(req.output_ids) - ahead))
    if not budget.any():
      return None
    reqs = [r if b else None for r, b in zip(self._slots, budget)]
    with_logprobs = any(r is not None and r.params.logprobs is not None for r in reqs)
    # Copies: a host array may back the device buffer (CPU), and these change during the block.
    toks, self._cache, self._last, info = self._generate(
        self.params, self._cache, self._last, self._temp.copy(), self._top_k.copy(),
        self._top_p.copy(), self._keys.copy(), self._pos.copy(), budget,
        with_logprobs=with_logprobs)
    self._pos += budget
    self.steps += int(budget.max())
    return _Block(toks, info, budget, reqs)

  def _take(self, block: '_Block') -> None:
    """Hands a finished block's tokens to their requests (those still in their slot)."""
    toks_RK = np.asarray(block.toks).T.tolist()
    info = jax.device_get(block.info)
    for slot in np.nonzero(block.budget)[0].tolist():
      req = block.reqs[slot]
      if self._slots[slot] is not req:   # ended (stop token, cancel) after the block started
        continue
      n = int(block.budget[slot])
      self._accept(slot, req, toks_RK[slot][:n],
                   None if info is None else tuple(x[:n, slot] for x in info))

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        self._reap()
        prefills = self._admit_waiting()
        block = self._dispatch()   # queued behind the prefills: the device never waits on the host
        if self.overlap:   # one block in flight while the host takes the previous one
          done, self._in_flight = self._in_flight, block
          if done is not None:   # dispatched before the prefills: holds none of their rows
            self._take(done)
        else:
          done = block
        for p in prefills:   # first tokens before any block that continues them
          self._take_prefill(p)
        if not self.overlap and block is not None:
          self._take(block)
        if done is None and block is None and not prefills:
          self._wake.wait(0.05)
          self._wake.clear()
      except Exception as e:  # keep serving; record what broke for /health and logs
        self.last_error = repr(e)
        self._in_flight = None
        self._admitting = False
        for slot, req in enumerate(list(self._slots)):
          if req is not None:
            self._finish(slot, req, f'error: {e}')
        time.sleep(0.01)

  def shutdown(self, drain_timeout_s: float = 10.0) -> None:
    """Stops admitting, lets running and queued requests finish up to the timeout, aborts the
    rest (finish reason 'abort'), then stops the device thread."""
    deadline = time.monotonic() + drain_timeout_s
    self._draining = True
    while (time.monotonic() < deadline and self.alive
           and (any(r is not None for r in self._slots) or self._waiting or self._admitting)):
      time.sleep(0.01)
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
    for slot, req in enumerate(list(self._slots)):
      if req is not None:
        self._finish(slot, req, 'abort')
    while (req := self._next_waiting()) is not None:
      self._finish(None, req, 'abort')
    self.ready = False

  def close(self) -> None:
    """Shuts down and frees device memory held by params and cache."""
    if self.alive:
      self.shutdown(drain_timeout_s=0)
    for x in jax.tree.leaves((self.params, self._cache, self._last)):
      if isinstance(x, jax.Array) and not x.is_deleted():
        x.delete()
    self.params = self._cache = self._last = None
