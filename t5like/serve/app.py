"""The HTTP API (fastapi): OpenAI-compatible completions, models, admin, health, metrics.

  POST /v1/completions                 OpenAI fields: model ('name' or 'name:version'), prompt (text,
                                       token ids, or a list of one of either), max_tokens (16),
                                       temperature (1.0), top_p, top_k (extension; 0 or -1 off), n=1,
                                       stop (string or up to 4), stop_token_ids (extension), seed,
                                       stream (SSE ending in `data: [DONE]`), stream_options
                                       {include_usage}, timeout (extension, seconds, at most the
                                       server's), return_token_ids (extension: the choice gets
                                       prompt_token_ids and token_ids), user (ignored)
  GET  /v1/models, /v1/models/{name}   OpenAI model objects; the latter adds TF Serving's
                                       model_version_status (LOADING, AVAILABLE, UNLOADING, END)
  POST /admin/models/{name}/load       {"version": N} optional; bearer token (401 without, 403 when
  POST /admin/models/{name}/unload     the server has no --admin_token)
  POST /admin/reload                   re-apply the version policy to the base path
  GET  /health/live, /health/ready     ready: a version AVAILABLE, warmed up, engine thread alive
  GET  /metrics                        Prometheus text format (t5like.serve.metrics)

Text prompts are encoded with the bundle's tokenizer; an encoder-decoder model gets EOS appended
(T5's inputs end with it), a decoder-only model does not. Token-id prompts are used as given.
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with the HTTP status: 400 for
malformed JSON, unknown or unsupported fields, bad values and over-long prompts (never truncated);
404 unknown model or version; 429 (Retry-After) queue full; 503 not available or shutting down;
504 a non-streaming request past its timeout (a streaming one ends with finish_reason "timeout");
500 an error inside one request, which never stops the server. Requests aborted by a shutdown end
with finish_reason "abort".
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from t5like.infer import engine as engine_lib
from t5like.serve import registry as registry_lib
from t5like.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

COMPLETIONS = '/v1/completions'
_MAX_STOP = 4
_ERROR_TYPES = {400: 'invalid_request_error', 401: 'authentication_error', 403: 'permission_error',
                404: 'not_found_error', 429: 'rate_limit_error', 500: 'server_error',
                503: 'service_unavailable', 504: 'timeout'}
# OpenAI fields we accept only at their neutral value (anything else is a 400 naming the field).
_NEUTRAL = {'echo': (False,), 'logprobs': (None, 0), 'best_of': (None, 1), 'suffix': (None, ''),
            'presence_penalty': (None, 0, 0.0), 'frequency_penalty': (None, 0, 0.0),
            'logit_bias': (None, {})}
_FIELDS = {'model', 'prompt', 'max_tokens', 'temperature', 'top_p', 'top_k', 'n', 'stop',
           'stop_token_ids', 'seed', 'stream', 'stream_options', 'user', 'timeout',
           'return_token_ids', *_NEUTRAL}


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}


def _error_response(e: ApiError) -> JSONResponse:
  body = {'error': {'message': e.message, 'type': _ERROR_TYPES.get(e.status, 'error'),
                    'param': e.param, 'code': e.code}}
  return JSONResponse(body, status_code=e.status, headers=e.headers)


# ---- request parsing -----------------------------------------------------------------------------

def _number(data, key, default, lo=None, hi=None, integer=False, lo_open=False):
  v = data.get(key, default)
  if v is None:
    return default
  ok = isinstance(v, int) if integer else isinstance(v, (int, float))
  if isinstance(v, bool) or not ok or (not integer and not math.isfinite(v)):
    raise ApiError(400, f'{key} must be {"an integer" if integer else "a number"}, got {v!r}', key)
  if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
    rng = f'{"(" if lo_open else "["}{lo}, {hi if hi is not None else "inf"}]'
    raise ApiError(400, f'{key} must be in {rng}, got {v!r}', key)
  return v


def parse_completion(data: Any) -> dict:
  """Checks an OpenAI completion body; returns the normalised fields or raises ApiError(400)."""
  if not isinstance(data, dict):
    raise ApiError(400, f'the request body must be a JSON object, got {type(data).__name__}')
  unknown = sorted(set(data) - _FIELDS)
  if unknown:
    raise ApiError(400, f'unknown field(s) {unknown}; supported fields: {sorted(_FIELDS)}',
                   unknown[0])
  for k, neutral in _NEUTRAL.items():
    if k in data and not any(data[k] == n and type(data[k]) is type(n) or data[k] is n
                             for n in neutral):
      raise ApiError(400, f'{k}={data[k]!r} is not supported by this server; omit it', k)
  model = data.get('model')
  if not isinstance(model, str) or not model:
    raise ApiError(400, "model is required: a model name ('name' or 'name:version')", 'model')
  if 'prompt' not in data:
    raise ApiError(400, 'prompt is required (text or a list of token ids)', 'prompt')
  prompt = data['prompt']
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]
  if isinstance(prompt, list):
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
      raise ApiError(400, 'prompt must be a string, a non-empty list of token ids, or a list '
                     'holding one of those (batched prompts are not supported: send one request '
                     'each)', 'prompt')
  elif not isinstance(prompt, str):
    raise ApiError(400, f'prompt must be a string or a list of token ids, got '
                   f'{type(prompt).__name__}', 'prompt')
  elif not prompt:
    raise ApiError(400, 'prompt is empty', 'prompt')
  n = _number(data, 'n', 1, integer=True)
  if n != 1:
    raise ApiError(400, f'n={n} is not supported; this server returns one choice (n=1)', 'n')
  stop = data.get('stop')
  if stop is None:
    stop = []
  elif isinstance(stop, str):
    stop = [stop]
  if (not isinstance(stop, list) or len(stop) > _MAX_STOP
      or not all(isinstance(s, str) and s for s in stop)):
    raise ApiError(400, f'stop must be a non-empty string or a list of up to {_MAX_STOP} of them',
                   'stop')
  stop_ids = data.get('stop_token_ids') or []
  if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in stop_ids):
    raise ApiError(400, 'stop_token_ids must be a list of token ids', 'stop_token_ids')
  stream = data.get('stream', False)
  if not isinstance(stream, bool):
    raise ApiError(400, f'stream must be true or false, got {stream!r}', 'stream')
  opts = data.get('stream_options') or {}
  if not isinstance(opts, dict) or set(opts) - {'include_usage', 'continuous_usage_stats'}:
    raise ApiError(400, 'stream_options may only hold include_usage', 'stream_options')
  if opts and not stream:
    raise ApiError(400, 'stream_options needs stream=true', 'stream_options')
  seed = data.get('seed')
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                           or not 0 <= seed < 2 ** 63):
    raise ApiError(400, f'seed must be a non-negative integer, got {seed!r}', 'seed')
  top_k = _number(data, 'top_k', 0, lo=-1, integer=True)
  for k in ('return_token_ids',):
    if not isinstance(data.get(k, False), bool):
      raise ApiError(400, f'{k} must be true or false', k)
  if 'user' in data and not isinstance(data['user'], str):
    raise ApiError(400, 'user must be a string', 'user')
  return dict(
      model=model, prompt=prompt, stop=stop, stop_token_ids=tuple(stop_ids), stream=stream,
      include_usage=bool(opts.get('include_usage')), seed=seed,
      max_tokens=_number(data, 'max_tokens', 16, lo=1, integer=True),
      temperature=float(_number(data, 'temperature', 1.0, lo=0, hi=2)),
      top_p=float(_number(data, 'top_p', 1.0, lo=0, hi=1, lo_open=True)),
      top_k=max(top_k, 0), return_token_ids=data.get('return_token_ids', False), timeout=_number(data, 'timeout', None, lo=0, lo_open=True))


def split_model(model: str) -> tuple[str, int | None]:
  name, sep, version = model.rpartition(':')
  if sep and version.isdigit():
    return name, int(version)
  return model, None


# ---- incremental detokenisation and stop strings -------------------------------------------------

class TextTracker:
  """Turns tokens into text deltas; holds back what could still become a stop string."""

  def __init__(self, tokenizer, stop: list[str]):
    self.tok, self.stop = tokenizer, stop
    self.hold = max((len(s) for s in stop), default=1) - 1
    self.ids: list[int] = []
    self.sent = 0
    self.text = ''
    self.stopped = False

  def add(self, token_id: int) -> str:
    """Appends a token; returns the new text that is safe to send."""
    self.ids.append(token_id)
    self.text = self.tok.decode(self.ids)
    for s in self.stop:
      i = self.text.find(s, max(0, self.sent - len(s)))
      if i >= 0:
        self.text, self.stopped = self.text[:i], True
    if self.stopped:
      return self.flush()
    end = len(self.text) - self.hold
    while end > self.sent and self.text[end - 1] == '\ufffd':   # an incomplete UTF-8 sequence
      end -= 1
    return self._take(end)

  def flush(self) -> str:
    return self._take(len(self.text))

  def _take(self, end: int) -> str:
    if end <= self.sent:
      return ''
    out, self.sent = self.text[self.sent:end], end
    return out


# ---- the app -------------------------------------------------------------------------------------

class _Counting:
  """ASGI middleware: counts every response by model, version, endpoint and status."""

  def __init__(self, app, metrics: ServerMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    status = {}

    async def wrapped(message):
      if message['type'] == 'http.response.start':
        status['code'] = message['status']
      await send(message)

    try:
      await self.app(scope, receive, wrapped)
    finally:
      route = scope.get('route')
      endpoint = getattr(route, 'path', None) or 'unmatched'
      self.metrics.requests.labels(scope.get('t5like.model', ''), scope.get('t5like.version', ''),
                                   endpoint, str(status.get('code', 500))).inc()


def create_app(registry: registry_lib.ModelRegistry, *, admin_token: str = '',
               metrics: ServerMetrics | None = None, request_timeout_s: float | None = 600.0,
               load_on_startup: bool = False, retry_after_s: int = 1) -> FastAPI:
  """The FastAPI app serving `registry`. `load_on_startup` applies the version policy in a
  background thread once the server runs (so /health/live answers while models compile)."""
  from contextlib import asynccontextmanager
  metrics = metrics or ServerMetrics(registry.snapshot)

  @asynccontextmanager
  async def lifespan(_app):
    if load_on_startup:
      threading.Thread(target=registry.reload, name='initial-load', daemon=True).start()
    yield

  app = FastAPI(title='t5like', lifespan=lifespan, docs_url=None, redoc_url=None)
  app.state.registry, app.state.metrics = registry, metrics
  app.add_middleware(_Counting, metrics=metrics)

  @app.exception_handler(ApiError)
  async def _api_error(_req, e: ApiError):
    return _error_response(e)

  def guarded(fn):
    """Turns an unexpected exception into a 500 of this request (handled here, so the
    connection and the server carry on)."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
      try:
        return await fn(*args, **kwargs)
      except ApiError:
        raise
      except Exception as e:
        log.exception('request failed')
        raise ApiError(500, f'internal error: {type(e).__name__}: {e}') from None
    return wrapper

  def reject(model: str, reason: str, e: ApiError):
    metrics.rejections.labels(model, reason).inc()
    raise e

  # ---- completions -------------------------------------------------------------------------------
  @app.post(COMPLETIONS)
  @guarded
  async def completions(request: Request):
    body = await request.body()
    try:
      data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      reject('', 'malformed_json', ApiError(400, f'the request body is not valid JSON: {e}'))
    try:
      p = parse_completion(data)
    except ApiError as e:
      reject(str(data.get('model', '')) if isinstance(data, dict) else '', 'bad_request', e)
    name, version = split_model(p['model'])
    request.scope['t5like.model'] = name
    try:
      mv = registry.get(name, version)
    except registry_lib.ModelNotFound as e:
      reject(name, 'unknown_model', ApiError(404, str(e), 'model', 'model_not_found'))
    except registry_lib.ModelUnavailable as e:
      reject(name, 'unavailable', ApiError(503, str(e), 'model', 'model_unavailable',
                                           {'Retry-After': str(retry_after_s)}))
    request.scope['t5like.version'] = str(mv.version)
    engine, tok = mv.engine, mv.tokenizer
    if engine is None:
      reject(name, 'unavailable', ApiError(503, f'model {name!r} is unloading', 'model'))
    if isinstance(p['prompt'], str):
      ids = tok.encode(p['prompt']) + ([tok.eos_id] if mv.cfg.is_encdec else [])
    else:
      ids = list(p['prompt'])
    sp = engine_lib.SamplingParams(max_tokens=p['max_tokens'], temperature=p['temperature'],
                                   top_k=p['top_k'], top_p=p['top_p'], seed=p['seed'],
                                   stop_token_ids=p['stop_token_ids'])
    try:
      engine.validate(ids, sp)
    except engine_lib.RequestTooLong as e:
      reject(name, 'prompt_too_long', ApiError(400, f'{e}; shorten the prompt (it is never '
                                               'truncated)', 'prompt', 'context_length_exceeded'))
    except ValueError as e:
      param = 'max_tokens' if 'max_tokens' in str(e) else 'prompt'
      reject(name, 'bad_request', ApiError(400, str(e), param))
    bad_stop = [t for t in p['stop_token_ids'] if not 0 <= t < mv.cfg.vocab_size]
    if bad_stop:
      reject(name, 'bad_request', ApiError(400, f'stop_token_ids out of range: {bad_stop}',
                                           'stop_token_ids'))
    timeout = request_timeout_s
    if p['timeout'] is not None:
      timeout = p['timeout'] if timeout is None else min(timeout, p['timeout'])

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    timer = metrics.timer(name, mv.version)

    def on_event(kind, value):   # engine thread
      if kind == 'token':
        timer.token()
      loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    req = engine_lib.Request(ids, sp, on_event, timeout_s=timeout)
    try:
      engine.submit(req)
    except engine_lib.QueueFull as e:
      reject(name, 'queue_full', ApiError(429, f'{e}; retry after {retry_after_s}s', None,
                                          'queue_full', {'Retry-After': str(retry_after_s)}))
    except engine_lib.EngineError as e:
      reject(name, 'shutting_down', ApiError(503, str(e), None, 'shutting_down',
                                             {'Retry-After': str(retry_after_s)}))
    gen = _Generation(req, engine, events, TextTracker(tok, p['stop']), timer,
                      ids if p['return_token_ids'] else None)
    meta = {'id': f'cmpl-{uuid.uuid4().hex}', 'created': int(time.time()),
            'model': f'{name}' if version is None else f'{name}:{version}'}
    if p['stream']:
      return StreamingResponse(gen.sse(meta, len(ids), p['include_usage']),
                               media_type='text/event-stream',
                               headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})
    text, reason = await gen.run(request)
    if reason == 'timeout':
      raise ApiError(504, f'the request timed out after {timeout}s ({gen.n} tokens generated); '
                     'raise "timeout" or lower max_tokens', 'timeout', 'timeout')
    if reason.startswith('error'):
      raise ApiError(500, f'generation failed: {reason}')
    choice = {'index': 0, 'text': text, 'logprobs': None, 'finish_reason': reason,
              **gen.token_fields()}
    return {**meta, 'object': 'text_completion', 'choices': [choice],
            'usage': _usage(len(ids), gen.n)}

  # ---- models ------------------------------------------------------------------------------------
  def model_object(name: str) -> dict:
    versions = registry.all_versions()
    loaded = [m.loaded_at for m in versions if m.name == name and m.loaded_at]
    return {'id': name, 'object': 'model', 'created': int(min(loaded) if loaded else 0),
            'owned_by': 't5like'}

  @app.get('/v1/models')
  @guarded
  async def list_models():
    names = sorted({m.name for m in registry.all_versions() if m.serving})
    return {'object': 'list', 'data': [model_object(n) for n in names]}

  @app.get('/v1/models/{name}')
  @guarded
  async def get_model(name: str, request: Request):
    request.scope['t5like.model'] = name
    try:
      status = registry.status(name)
    except registry_lib.ModelNotFound as e:
      raise ApiError(404, str(e), 'model', 'model_not_found') from None
    return {**model_object(name), 'model_version_status': status}

  # ---- admin -------------------------------------------------------------------------------------
  def check_admin(request: Request) -> None:
    if not admin_token:
      raise ApiError(403, 'admin endpoints are disabled: start the server with --admin_token or '
                     'T5LIKE_ADMIN_TOKEN set')
    got = request.headers.get('authorization', '')
    scheme, _, token = got.partition(' ')
    if scheme.lower() != 'bearer' or not hmac.compare_digest(token.encode(), admin_token.encode()):
      raise ApiError(401, 'admin endpoints need "Authorization: Bearer <admin token>"', None,
                     'unauthorized', {'WWW-Authenticate': 'Bearer'})

  async def version_of(request: Request) -> int | None:
    body = await request.body()
    if not body:
      return None
    try:
      data = json.loads(body)
    except json.JSONDecodeError as e:
      raise ApiError(400, f'the request body is not valid JSON: {e}') from None
    if not isinstance(data, dict) or set(data) - {'version'}:
      raise ApiError(400, 'the body may only hold {"version": <int>}')
    v = data.get('version')
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
      raise ApiError(400, f'version must be a non-negative integer, got {v!r}', 'version')
    return v

  async def admin(request: Request, name: str, fn):
    check_admin(request)
    request.scope['t5like.model'] = name
    version = await version_of(request)
    try:
      status = await run_in_threadpool(fn, name, version)
    except registry_lib.ModelNotFound as e:
      raise ApiError(404, str(e), 'model', 'model_not_found') from None
    return {'model': name, 'model_version_status': status}

  @app.post('/admin/models/{name}/load')
  @guarded
  async def admin_load(name: str, request: Request):
    return await admin(request, name, registry.load)

  @app.post('/admin/models/{name}/unload')
  @guarded
  async def admin_unload(name: str, request: Request):
    return await admin(request, name, registry.unload)

  @app.post('/admin/reload')
  @guarded
  async def admin_reload(request: Request):
    check_admin(request)
    await run_in_threadpool(registry.reload)
    return {'models': {n: registry.status(n) for n in registry.names()}}

  # ---- health and metrics ------------------------------------------------------------------------
  @app.get('/health/live')
  async def live():
    return {'status': 'alive'}

  @app.get('/health/ready')
  async def ready():
    ok, why = registry.ready()
    return JSONResponse({'ready': ok, 'reason': why}, status_code=200 if ok else 503)

  @app.get('/metrics')
  async def prometheus():
    return Response(metrics.render(), media_type='text/plain; version=0.0.4; charset=utf-8')

  return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens}


class _Generation:
  """Consumes one request's engine events on the event loop."""

  def __init__(self, req, engine, events: asyncio.Queue, text: TextTracker, timer,
               prompt_ids=None):
    self.req, self.engine, self.events, self.text, self.timer = req, engine, events, text, timer
    self.prompt_ids = prompt_ids       # set when the request asked for return_token_ids
    self._sent_ids = 0
    self.n = 0
    self.reason: str | None = None
    self._recorded = False

  async def next(self) -> tuple[str, str | None]:
    """(text delta, finish reason or None) after the next engine event."""
    while True:
      kind, value = await self.events.get()
      if kind == 'finish':
        self.reason = 'stop' if self.text.stopped else value
        return self.text.flush(), self.reason
      if self.text.stopped:   # tokens that arrive after a stop string ended the text
        continue
      self.n += 1
      delta = self.text.add(int(value))
      if self.text.stopped:
        self.engine.cancel(self.req)
        # The engine's finish event (abort) follows; report the stop now.
        self.reason = 'stop'
        return delta, None
      return delta, None

  def token_fields(self, delta: bool = False) -> dict:
    if self.prompt_ids is None:
      return {}
    ids = self.text.ids[:self.n]
    if delta:
      out, self._sent_ids = ids[self._sent_ids:], len(ids)
      return {'token_ids': out, **({'prompt_token_ids': self.prompt_ids} if not
                                   self._sent_ids - len(out) else {})}
    return {'prompt_token_ids': self.prompt_ids, 'token_ids': ids}

  def record(self) -> None:
    if not self._recorded:
      self._recorded = True
      self.timer.finish(self.req, self.reason or 'abort', self.n)

  async def run(self, request: Request) -> tuple[str, str]:
    parts = []
    try:
      while True:
        try:
          delta, reason = await asyncio.wait_for(self.next(), timeout=1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            self.engine.cancel(self.req)
            self.reason = 'abort'
            return ''.join(parts), 'abort'
          continue
        parts.append(delta)
        if reason is not None:
          return ''.join(parts), reason
    finally:
      self.record()

  async def sse(self, meta: dict, prompt_tokens: int, include_usage: bool):
    def chunk(text, reason, usage=None):
      body = {**meta, 'object': 'text_completion',
              'choices': [{'index': 0, 'text': text, 'logprobs': None, 'finish_reason': reason,
                           **self.token_fields(delta=True)}]}
      if usage is not None:
        body.update(choices=[], usage=usage)
      return f'data: {json.dumps(body)}\n\n'
    try:
      while True:
        delta, reason = await self.next()
        if reason is not None and reason.startswith('error'):
          if delta:
            yield chunk(delta, None)
          err = {'error': {'message': f'generation failed: {reason}', 'type': 'server_error',
                           'param': None, 'code': None}}
          yield f'data: {json.dumps(err)}\n\n'
          break
        yield chunk(delta, reason)
        if reason is not None:
          break
      if include_usage:
        yield chunk('', None, _usage(prompt_tokens, self.n))
      yield 'data: [DONE]\n\n'
    finally:   # also on client disconnect (the generator is closed)
      if self.reason is None:
        self.engine.cancel(self.req)
      self.record()
