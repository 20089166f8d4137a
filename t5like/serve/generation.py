"""One HTTP request's generations on the event loop: n choices x prompts, text, stop strings,
logprobs, disconnects.

The engine thread reports each request's tokens through `on_event`; `Generation` turns them into
text deltas per choice (holding back what could still become a stop string), collects logprobs
when asked, and cancels every engine request of a client that went away (a watcher task waits for
the ASGI `http.disconnect`), so its slots are freed within one decode step.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import weakref
from typing import Any

from t5like.data.tokenizer import IncrementalDecoder
from t5like.infer import engine as engine_lib
from t5like.serve.metrics import RequestTimer


class TextTracker:
  """Turns tokens into text deltas; holds back what could still become a stop string.

  Detokenises incrementally (`IncrementalDecoder`: no SentencePiece call per token); bytes of a
  character not yet complete wait for the next token."""

  def __init__(self, tokenizer, stop: list[str]):
    self.stop = stop
    self.hold = max((len(s) for s in stop), default=1) - 1
    self.ids: list[int] = []
    self.sent = 0
    self.text = ''
    self.piece = ''          # the text the last token added (its logprob entry's "token")
    self.stopped = False
    self._decoder = IncrementalDecoder(tokenizer)

  def add(self, token_id: int) -> str:
    """Appends a token; returns the new text that is safe to send."""
    self.ids.append(token_id)
    self.piece = self._decoder.add(token_id)
    self.text += self.piece
    for s in self.stop:
      i = self.text.find(s, max(0, self.sent - len(s)))
      if i >= 0:
        self.text, self.stopped = self.text[:i], True
    if self.stopped:
      return self.flush()
    return self._take(len(self.text) - self.hold)

  def flush(self) -> str:
    if not self.stopped:
      self.text += self._decoder.flush()
    return self._take(len(self.text))

  def _take(self, end: int) -> str:
    if end <= self.sent:
      return ''
    out, self.sent = self.text[self.sent:end], end
    return out


@dataclasses.dataclass
class TokenLogprob:
  token: str
  logprob: float
  top: list[tuple[str, float]]     # the most likely tokens at this step, best first


@dataclasses.dataclass
class Choice:
  index: int
  req: engine_lib.Request
  text: TextTracker
  timer: RequestTimer
  prompt_ids: list[int]
  prompt_index: int
  n: int = 0                                   # tokens that made it into the text
  reason: str | None = None
  logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
  echo: str = ''                               # prompt text to put in front (echo=true)
  echo_logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
  _sent_ids: int = 0
  _sent_logprobs: int = 0
  prompt_ids_sent: bool = False

  @property
  def done(self) -> bool:
    return self.reason is not None

  @property
  def has_new_ids(self) -> bool:
    """Tokens not yet streamed (their text may still be empty: a partial character, a lone
    space piece)."""
    return self.n > self._sent_ids

  def new_ids(self) -> list[int]:
    ids = self.text.ids[self._sent_ids:self.n]
    self._sent_ids = self.n
    return ids

  def new_logprobs(self) -> list[TokenLogprob]:
    out = self.logprobs[self._sent_logprobs:]
    self._sent_logprobs = len(self.logprobs)
    return out


class LoopBridge:
  """Calls from the engine thread onto one event loop, batched: the calls of one decode step (a
  token for each live request) wake the loop once, not once per request."""

  _by_loop: 'weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge]' = (
      weakref.WeakKeyDictionary())

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self.loop = loop
    self._pending: collections.deque = collections.deque()
    self._lock = threading.Lock()
    self._scheduled = False

  @classmethod
  def of_running_loop(cls) -> 'LoopBridge':
    loop = asyncio.get_running_loop()
    bridge = cls._by_loop.get(loop)
    if bridge is None:
      bridge = cls._by_loop[loop] = cls(loop)
    return bridge

  def call(self, fn, *args) -> None:
    """fn(*args) on the loop, soon (thread-safe)."""
    self._pending.append((fn, args))
    with self._lock:
      if self._scheduled:
        return
      self._scheduled = True
    self.loop.call_soon_threadsafe(self._drain)

  def _drain(self) -> None:
    with self._lock:
      self._scheduled = False
    while self._pending:
      fn, args = self._pending.popleft()
      fn(*args)


class Generation:
  """The engine requests of one HTTP request (each prompt x n choices) as one event stream."""

  def __init__(self, engine, tokenizer, timer_factory, *, stop: list[str], logprobs: int | None):
    self.engine, self.tok, self.timer_factory = engine, tokenizer, timer_factory
    self.stop, self.logprobs = stop, logprobs
    self.bridge = LoopBridge.of_running_loop()
    self.events: asyncio.Queue = asyncio.Queue()
    self._peeked = None     # an event taken early that belongs to another choice
    self.choices: list[Choice] = []
    self.disconnected = False

  def add(self, prompt_ids: list[int], params: engine_lib.SamplingParams, timeout_s,
          prompt_index: int) -> Choice:
    index = len(self.choices)
    timer = self.timer_factory()

    def on_event(kind, value):   # engine thread
      if kind == 'tokens':
        timer.add_tokens(len(value))
      self.bridge.call(self.events.put_nowait, (index, kind, value))

    req = engine_lib.Request(prompt_ids, params, on_event, timeout_s=timeout_s)
    c = Choice(index, req, TextTracker(self.tok, self.stop), timer, prompt_ids, prompt_index)
    self.choices.append(c)
    return c

  def submit(self) -> None:
    """Submits every choice; if one is refused (queue full, shutting down) the others are
    cancelled and the error propagates."""
    done = []
    try:
      for c in self.choices:
        self.engine.submit(c.req)
        done.append(c)
    except Exception:
      for c in done:
        self.engine.cancel(c.req)
      raise

  def cancel(self) -> None:
    for c in self.choices:
      if not c.done:
        self.engine.cancel(c.req)

  @property
  def remaining(self) -> int:
    return sum(not c.done for c in self.choices)

  def _logprob_entry(self, c: Choice) -> None:
    if self.logprobs is None or len(c.req.logprobs) < c.n:
      return
    entries = c.req.logprobs
    lp, top_ids, top_lps = entries[c.n - 1]
    top = [(self.tok.decode([t]), float(v)) for t, v in zip(top_ids[:self.logprobs], top_lps)]
    c.logprobs.append(TokenLogprob(c.text.piece, float(lp), top))

  def _ready(self):
    """The next event if one has already arrived, else None."""
    if self._peeked is not None:
      event, self._peeked = self._peeked, None
      return event
    try:
      return self.events.get_nowait()
    except asyncio.QueueEmpty:
      return None

  def _tokens(self, c: Choice, token_ids) -> str:
    """The text of `token_ids`, up to a stop string (then `c.text.stopped`)."""
    delta = ''
    for t in token_ids:
      c.n += 1
      delta += c.text.add(t)
      self._logprob_entry(c)
      if c.text.stopped:
        break
    return delta

  async def next(self) -> tuple[Choice, str, str | None]:
    """(choice, text delta, finish reason or None) after the next event that matters. Tokens of
    that choice that have already arrived join the same delta: a loop that falls behind under
    load sends fewer, larger chunks instead of falling further behind."""
    while True:
      index, kind, value = self._ready() or await self.events.get()
      c = self.choices[index]
      if c.done:      # the engine's finish after a stop string (or a cancel) already reported
        continue
      delta = ''
      while True:
        if kind == 'finish':
          c.reason = 'stop' if c.text.stopped else str(value)
          return c, delta + c.text.flush(), c.reason
        delta += self._tokens(c, value)
        if c.text.stopped:
          self.engine.cancel(c.req)
          c.reason = 'stop'
          return c, delta, 'stop'
        event = self._ready()
        if event is None:
          return c, delta, None
        if event[0] != index:
          self._peeked = event
          return c, delta, None
        _, kind, value = event

  async def watch(self, receive) -> None:
    """Cancels every engine request once the client disconnects."""
    while True:
      msg = await receive()
      if msg['type'] == 'http.disconnect':
        self.disconnected = True
        self.cancel()
        return

  def record(self) -> None:
    for c in self.choices:
      c.timer.finish(c.req, c.reason or 'abort', c.n)

  async def run(self, receive) -> None:
    """Consumes every choice to its end (non-streaming)."""
    watcher = asyncio.ensure_future(self.watch(receive))
    try:
      while self.remaining:
        await self.next()
    finally:
      watcher.cancel()
      self.cancel()
      self.record()

  def usage(self) -> dict[str, Any]:
    prompts = {c.prompt_index: len(c.prompt_ids) for c in self.choices}
    p, g = sum(prompts.values()), sum(c.n for c in self.choices)
    return {'prompt_tokens': p, 'completion_tokens': g, 'total_tokens': p + g}
