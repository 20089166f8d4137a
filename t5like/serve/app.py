"""The HTTP API (fastapi): OpenAI-compatible completions and chat, scoring, models, admin, health.

  POST /v1/completions        OpenAI's fields (t5like.serve.schemas.CompletionRequest): prompt is
                              text, token ids, or a list of either (batched: one choice per prompt
                              and n); n, logprobs (top-N per token), echo (decoder-only), stop,
                              seed, stream (SSE ending in `data: [DONE]`), stream_options;
                              extensions top_k, stop_token_ids, timeout (seconds, at most the
                              server's), return_token_ids
  POST /v1/chat/completions   messages rendered by the bundle's chat template (t5like.serve.chat);
                              n, logprobs + top_logprobs, stream, the sampling fields above
  POST /v1/score              log-likelihood of each target given the input, batched
  POST /tokenize, /detokenize the bundle's tokenizer
  GET  /v1/models, /v1/models/{name}   OpenAI model objects; the latter adds `ready` and TF
                              Serving's model_version_status (LOADING, AVAILABLE, UNLOADING, END,
                              with the error of a failed load)
  POST /admin/models/{name}/load, /admin/models/{name}/unload, /admin/reload   bearer token
                              (401 without, 403 when the server has none); not in /openapi.json
  GET  /health/live           the process answers (never waits on work)
  GET  /health/ready, /health every model found at start-up AVAILABLE, warmed up, engine alive
  GET  /metrics               Prometheus text (t5like.serve.metrics; vLLM names on request)

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 malformed or
out-of-range input (never truncated), 404 unknown model, version or route, 405 wrong method, 413
body over `max_body_bytes`, 429 queue full (Retry-After), 503 not available or shutting down, 504
a non-streaming request past its timeout (a stream ends with finish_reason "timeout"), 500 an error
inside one request (the server carries on). Bodies over INLINE_BODY_BYTES are parsed, validated
and tokenised in worker threads, so the loop never blocks on them. Public answers name no
filesystem path. The ASGI layers around the routes (body limit, response counts, guarded routes)
are t5like.serve.middleware.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from t5like.infer import engine as engine_lib
from t5like.serve import registry as registry_lib
from t5like.serve import schemas
from t5like.serve.chat import ChatTemplateError
from t5like.serve.event_stream import DONE, EventStream
from t5like.serve.generation import Generation, TokenLogprob
from t5like.serve.metrics import OTHER_MODEL, ServerMetrics
from t5like.serve.middleware import BodyLimit, GuardedRoute, ResponseCounting, error_response
from t5like.serve.schemas import ApiError

log = logging.getLogger(__name__)

COMPLETIONS = '/v1/completions'
CHAT = '/v1/chat/completions'
DEFAULT_MAX_BODY_BYTES = 4 << 20
# Bodies up to this size are parsed and their prompts tokenised on the event loop (tens of
# microseconds; a worker-thread hop costs more under load); larger ones in a worker thread, so
# the loop never blocks on them.
INLINE_BODY_BYTES = 8 << 10


def split_model(model: str) -> tuple[str, int | None]:
  name, sep, version = model.rpartition(':')
  if sep and version.isdigit() and len(version) < 10:
    return name, int(version)
  return model, None


_ABS_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"():,;]+")


def public_message(message: str, base_path: str) -> str:
  """`message` without filesystem paths: a path under the base path keeps its part inside it
  (`<name>/<version>/<file>`), any other absolute path becomes `<path>`."""
  base = base_path.rstrip('/') + '/'

  def sub(m):
    p = m.group(0)
    return p[len(base):] if p.startswith(base) else '<path>'
  return _ABS_PATH.sub(sub, message)


# ---- the app -------------------------------------------------------------------------------------

def create_app(registry: registry_lib.ModelRegistry, *, admin_token: str = '',
               metrics: ServerMetrics | None = None, request_timeout_s: float | None = 600.0,
               load_on_startup: bool = False, retry_after_s: int = 1,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, strict_fields: bool = False,
               metrics_names: str = 't5like') -> FastAPI:
  """The FastAPI app serving `registry`. `load_on_startup` applies the version policy in a
  background thread once the server runs (so /health/live answers while models compile);
  `strict_fields` refuses unknown body fields (default: accept them, naming them in a Warning
  header); `metrics_names` 'vllm' exposes vLLM's metric names."""
  metrics = metrics or ServerMetrics(registry.snapshot, names=metrics_names)
  body_models: dict[str, dict] = {}

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    if load_on_startup:
      threading.Thread(target=registry.reload, name='initial-load', daemon=True).start()
    yield

  app = FastAPI(title='t5like', version='1', lifespan=lifespan, docs_url=None, redoc_url=None)
  app.router.route_class = GuardedRoute
  app.state.registry, app.state.metrics = registry, metrics
  registry.load_failure_hooks.append(
      lambda name, kind: metrics.load_failures.labels(name, kind).inc())
  app.add_middleware(BodyLimit, limit=max_body_bytes)
  app.add_middleware(ResponseCounting, metrics=metrics, is_model=registry.is_model)

  def public(message: str) -> str:
    return public_message(message, registry.base_path)

  # ---- errors: every one in OpenAI's shape -------------------------------------------------------
  @app.exception_handler(ApiError)
  async def _api_error(_req, e: ApiError):
    e.message = public(e.message)
    return error_response(e)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(req: Request, e: StarletteHTTPException):
    if e.status_code == 404:
      msg = 'no such route; see /openapi.json for the routes this server has'
    elif e.status_code == 405:
      msg = f'method {req.method} is not allowed on this route'
    else:
      msg = str(e.detail)
    return error_response(ApiError(e.status_code, msg, None, None, dict(e.headers or {})))

  @app.exception_handler(RequestValidationError)
  async def _validation_error(_req, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    param = '.'.join(str(p) for p in first.get('loc', ())[1:]) or None
    return error_response(ApiError(400, f'{param}: {first.get("msg", "invalid request")}', param))

  def reject(model: str, reason: str, e: ApiError):
    metrics.rejections.labels(model if registry.is_model(model) else OTHER_MODEL, reason).inc()
    raise e

  async def sized(request: Request, fn, *args, **kw):
    """fn(*args, **kw) on the loop for a small request body, else in a worker thread."""
    if getattr(request.state, 'body_bytes', INLINE_BODY_BYTES + 1) <= INLINE_BODY_BYTES:
      return fn(*args, **kw)
    return await run_in_threadpool(fn, *args, **kw)

  async def parse(request: Request, cls):
    body = await request.body()
    request.state.body_bytes = len(body)
    try:
      req, unknown = await sized(request, schemas.parse_body, cls, body,
                                 strict_fields=strict_fields)
    except ApiError as e:
      reject('', 'bad_request', e)
    request.state.unknown_fields = unknown
    return req

  def headers(request: Request, extra: dict | None = None) -> dict:
    out = dict(extra or {})
    unknown = getattr(request.state, 'unknown_fields', None)
    if unknown:
      note = f'299 t5like "unknown fields ignored: {", ".join(unknown)}"'
      out['Warning'] = ascii(note)[1:-1][:300]   # header values are ASCII
    return out

  def lookup(request: Request, model: str) -> registry_lib.ModelVersion:
    name, version = split_model(model)
    request.scope['t5like.model'] = name
    try:
      mv = registry.get(name, version)
    except registry_lib.ModelNotFound as e:
      reject(name, 'unknown_model', ApiError(404, str(e), 'model', 'model_not_found'))
    except registry_lib.ModelUnavailable as e:
      reject(name, 'unavailable', ApiError(503, str(e), 'model', 'model_unavailable',
                                           {'Retry-After': str(retry_after_s)}))
    request.scope['t5like.version'] = str(mv.version)
    if mv.engine is None:
      reject(name, 'unavailable', ApiError(503, f'model {name!r} is unloading', 'model'))
    return mv

  def encode(mv, prompt, param: str = 'prompt', add_eos: bool = True) -> list[int]:
    """Token ids of a text or id prompt, checked against the engine (worker thread)."""
    if isinstance(prompt, str):
      ids = encode_text(mv.tokenizer, prompt, mv.engine.max_prompt_len)
      if ids is None:
        raise ApiError(400, f'{param} has more than {mv.engine.max_prompt_len} tokens, the most '
                       'this model accepts; shorten it (it is never truncated)', param,
                       'context_length_exceeded')
      return ids + ([mv.tokenizer.eos_id] if add_eos else [])
    bad = [t for t in prompt if t >= mv.cfg.vocab_size]
    if bad:
      raise ApiError(400, f'{param}: token ids out of range [0, {mv.cfg.vocab_size}): {bad[:5]}',
                     param)
    return list(prompt)

  def checked(mv, ids: list[int], sp: engine_lib.SamplingParams, which: str = '',
              param: str = 'prompt') -> None:
    try:
      mv.engine.validate(ids, sp)
    except engine_lib.RequestTooLong as e:
      raise ApiError(400, f'{which}{e}; shorten the {param} (never truncated)', param,
                     'context_length_exceeded') from None
    except ValueError as e:
      raise ApiError(400, f'{which}{e}', 'max_tokens' if 'max_tokens' in str(e) else param) \
          from None

  def sampling(req, mv, max_tokens: int | None) -> engine_lib.SamplingParams:
    bad_stop = [t for t in req.stop_token_ids or () if t >= mv.cfg.vocab_size]
    if bad_stop:
      raise ApiError(400, f'stop_token_ids out of range [0, {mv.cfg.vocab_size}): {bad_stop[:5]}',
                     'stop_token_ids')
    if req.stream_options is not None and not req.stream:
      raise ApiError(400, 'stream_options needs stream=true', 'stream_options')
    top_k = req.top_k or 0
    return engine_lib.SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else mv.engine.max_new_tokens,
        temperature=1.0 if req.temperature is None else req.temperature, top_k=max(top_k, 0),
        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
        stop_token_ids=tuple(req.stop_token_ids or ()))

  def timeout_of(req) -> float | None:
    if req.timeout is None:
      return request_timeout_s
    return req.timeout if request_timeout_s is None else min(request_timeout_s, req.timeout)

  def start(request, mv, gen: Generation, name: str) -> None:
    try:
      gen.submit()
    except engine_lib.QueueFull as e:
      reject(name, 'queue_full', ApiError(429, f'{e}; retry after {retry_after_s}s', None,
                                          'queue_full', {'Retry-After': str(retry_after_s)}))
    except engine_lib.EngineError as e:
      reject(name, 'shutting_down', ApiError(503, str(e), None, 'shutting_down',
                                             {'Retry-After': str(retry_after_s)}))

  def finish_errors(gen: Generation, timeout) -> None:
    reasons = [c.reason or '' for c in gen.choices]
    if 'timeout' in reasons:
      n = sum(c.n for c in gen.choices)
      raise ApiError(504, f'the request timed out after {timeout}s ({n} tokens generated); '
                     'raise "timeout" or lower max_tokens', 'timeout', 'timeout')
    errors = [r for r in reasons if r.startswith('error')]
    if errors:
      raise ApiError(500, public(f'generation failed: {errors[0]}'))

  def sse_error(reason: str) -> str:
    err = ApiError(500, public(f'generation failed: {reason}'))
    return f'data: {json.dumps(err.body())}\n\n'

  def event_stream(request: Request, req, gen: Generation, chunk: dict, opening: list[str],
                   render) -> EventStream:
    """The SSE answer of a streaming request: `opening`, then `render(choice, delta, reason)` of
    each event ('' sends nothing), the usage and DONE sharing the last event's write. However the
    stream ends (a client gone too), its engine requests are cancelled and recorded."""
    async def events():
      watcher = asyncio.ensure_future(gen.watch(request.receive))
      try:
        for text in opening:
          yield text
        while True:
          out = ''
          if gen.remaining:
            c, delta, reason = await gen.next()
            out = (sse_error(reason) if reason is not None and reason.startswith('error')
                   else render(c, delta, reason))
          if not gen.remaining:
            yield out + stream_end(req, gen, chunk)
            return
          if out:
            yield out
      finally:
        watcher.cancel()
        gen.cancel()
        gen.record()
    return EventStream(events(), headers(request, {'Cache-Control': 'no-cache',
                                                   'X-Accel-Buffering': 'no'}))

  # ---- completions -------------------------------------------------------------------------------
  def completion_logprobs(entries) -> dict:
    tokens, lps, tops, offsets, pos = [], [], [], [], 0
    for e in entries:
      tokens.append(e.token if e else '')
      lps.append(e.logprob if e and e.logprob is not None else None)
      top = {}
      for t, v in (e.top if e else ()):   # tokens that decode alike keep the likelier's value
        top.setdefault(t, v)
      tops.append(top or None)
      offsets.append(pos)
      pos += len(e.token) if e else 0
    return {'tokens': tokens, 'token_logprobs': lps, 'top_logprobs': tops, 'text_offset': offsets}

  @app.post(COMPLETIONS, openapi_extra=_body_schema(schemas.CompletionRequest, body_models))
  async def completions(request: Request):
    req = await parse(request, schemas.CompletionRequest)
    mv = lookup(request, req.model)
    name = mv.name
    try:
      if req.echo and mv.cfg.is_encdec:
        raise ApiError(400, 'echo=true needs a decoder-only model: an encoder-decoder model does '
                       'not continue its prompt', 'echo')
      if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f'best_of={req.best_of} is not supported; omit it or set it to n',
                       'best_of')
      sp = sampling(req, mv, req.max_tokens)
      sp.logprobs = req.logprobs
      prompts = req.prompt
      if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]

      def prepare():
        ids = [encode(mv, p, add_eos=mv.cfg.is_encdec) for p in prompts]
        for i, x in enumerate(ids):
          checked(mv, x, sp, f'prompt {i}: ' if len(ids) > 1 else '')
        echo = []
        if req.echo:
          for p, x in zip(prompts, ids):
            text = p if isinstance(p, str) else mv.tokenizer.decode(x)
            lps = _prompt_logprobs(mv, x, req.logprobs) if req.logprobs is not None else []
            echo.append((text, lps))
        return ids, echo
      # echo with logprobs runs the model over the prompts: never on the loop
      ids_list, echo = (await run_in_threadpool(prepare) if req.echo and req.logprobs is not None
                        else await sized(request, prepare))
    except ApiError as e:
      reject(name, 'bad_request', e)
    timeout = timeout_of(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    gen = Generation(mv.engine, mv.tokenizer, lambda: metrics.timer(name, mv.version), stop=stop,
                     logprobs=req.logprobs)
    for pi, ids in enumerate(ids_list):
      for j in range(req.n):
        seed = None if req.seed is None else (req.seed + j) % 2 ** 63
        c = gen.add(ids, _replace(sp, seed=seed), timeout, pi)
        if echo:
          c.echo, c.echo_logprobs = echo[pi]
    start(request, mv, gen, name)
    meta = {'id': f'cmpl-{uuid.uuid4().hex}', 'created': int(time.time()), 'model': req.model}

    def choice_body(c, text, reason, entries=None):
      """One choice: the whole of it, or (a stream chunk) `text` with its logprob `entries`."""
      stream = entries is not None
      body = {'index': c.index, 'text': text, 'logprobs': None, 'finish_reason': reason}
      if req.logprobs is not None:
        body['logprobs'] = completion_logprobs(entries if stream else
                                               list(c.echo_logprobs) + c.logprobs)
      if req.return_token_ids:
        body['token_ids'] = c.new_ids() if stream else c.text.ids[:c.n]
        if not (stream and c.prompt_ids_sent):
          body['prompt_token_ids'] = c.prompt_ids
          c.prompt_ids_sent = True
      return body

    if req.stream:
      chunk = {**meta, 'object': 'text_completion'}

      def render(c, delta, reason) -> str:
        # with token ids asked for, every token is streamed, even one whose text is empty yet
        if (delta or reason is not None or (req.logprobs is not None and c.logprobs)
            or (req.return_token_ids and c.has_new_ids)):
          return _sse({**chunk, 'choices': [choice_body(c, delta, reason, c.new_logprobs())]})
        return ''
      return event_stream(request, req, gen, chunk, [
          _sse({**chunk, 'choices': [choice_body(c, c.echo, None, c.echo_logprobs)]})
          for c in gen.choices if c.echo], render)
    await gen.run(request.receive)
    finish_errors(gen, timeout)
    choices = [choice_body(c, c.echo + c.text.text[:c.text.sent], c.reason)
               for c in gen.choices]
    return JSONResponse({**meta, 'object': 'text_completion', 'choices': choices,
                         'usage': gen.usage()}, headers=headers(request))

  # ---- chat --------------------------------------------------------------------------------------
  def chat_logprobs(entries) -> dict:
    def one(token, lp):
      return {'token': token, 'logprob': lp, 'bytes': list(token.encode('utf-8'))}
    return {'content': [{**one(e.token, e.logprob), 'top_logprobs': [one(t, v) for t, v in e.top]}
                        for e in entries]}

  @app.post(CHAT, openapi_extra=_body_schema(schemas.ChatCompletionRequest, body_models))
  async def chat_completions(request: Request):
    req = await parse(request, schemas.ChatCompletionRequest)
    mv = lookup(request, req.model)
    name = mv.name
    try:
      if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, 'give max_tokens or max_completion_tokens, not both', 'max_tokens')
      sp = sampling(req, mv, req.max_completion_tokens or req.max_tokens)
      sp.logprobs = (req.top_logprobs or 0) if req.logprobs else None
      messages = [{'role': m.role, 'content': m.text(), **({'name': m.name} if m.name else {})}
                  for m in req.messages]

      def prepare():
        try:
          text = mv.chat_template.render(messages, req.add_generation_prompt)
        except ChatTemplateError as e:
          raise ApiError(400, str(e), 'messages') from None
        ids = encode(mv, text, 'messages', add_eos=mv.cfg.is_encdec)
        checked(mv, ids, sp, param='messages')
        return ids
      ids = await sized(request, prepare)
    except ApiError as e:
      reject(name, 'bad_request', e)
    timeout = timeout_of(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    gen = Generation(mv.engine, mv.tokenizer, lambda: metrics.timer(name, mv.version), stop=stop,
                     logprobs=sp.logprobs)
    for j in range(req.n):
      gen.add(ids, _replace(sp, seed=None if req.seed is None else (req.seed + j) % 2 ** 63),
              timeout, 0)
    start(request, mv, gen, name)
    meta = {'id': f'chatcmpl-{uuid.uuid4().hex}', 'created': int(time.time()), 'model': req.model}

    def extras(c, stream):
      out = {}
      if req.return_token_ids:
        out['token_ids'] = c.new_ids() if stream else c.text.ids[:c.n]
      return out

    if req.stream:
      chunk = {**meta, 'object': 'chat.completion.chunk'}

      def render(c, delta, reason) -> str:
        new = c.new_logprobs() if req.logprobs else []
        if delta or reason is not None or new or (req.return_token_ids and c.has_new_ids):
          return _sse({**chunk, 'choices': [{
              'index': c.index, 'delta': {'content': delta} if delta else {},
              'logprobs': chat_logprobs(new) if req.logprobs else None,
              'finish_reason': reason, **extras(c, True)}]})
        return ''
      return event_stream(request, req, gen, chunk, [
          _sse({**chunk, 'choices': [{'index': c.index, 'delta': {'role': 'assistant',
                                                                  'content': ''},
                                      'logprobs': None, 'finish_reason': None}]})
          for c in gen.choices], render)
    await gen.run(request.receive)
    finish_errors(gen, timeout)
    choices = [{'index': c.index,
                'message': {'role': 'assistant', 'content': c.text.text[:c.text.sent]},
                'logprobs': chat_logprobs(c.logprobs) if req.logprobs else None,
                'finish_reason': c.reason, **extras(c, False)} for c in gen.choices]
    return JSONResponse({**meta, 'object': 'chat.completion', 'choices': choices,
                         'usage': gen.usage()}, headers=headers(request))

  # ---- scoring and tokenizer ---------------------------------------------------------------------
  @app.post('/v1/score', openapi_extra=_body_schema(schemas.ScoreRequest, body_models))
  async def score(request: Request):
    req = await parse(request, schemas.ScoreRequest)
    mv = lookup(request, req.model)
    add_eos = mv.cfg.is_encdec if req.add_eos is None else req.add_eos

    def run():
      inp = encode(mv, req.input, 'input', add_eos=mv.cfg.is_encdec)
      out = []
      for i, t in enumerate(req.targets):
        ids = encode(mv, t, f'targets.{i}', add_eos=add_eos)
        try:
          lps = mv.engine.score(inp, ids)
        except engine_lib.RequestTooLong as e:
          raise ApiError(400, f'targets.{i}: {e}', f'targets.{i}', 'context_length_exceeded') \
              from None
        except ValueError as e:
          raise ApiError(400, f'targets.{i}: {e}', f'targets.{i}') from None
        item = {'index': i, 'object': 'score', 'logprob': float(sum(lps)), 'num_tokens': len(ids)}
        if req.return_token_logprobs:
          item.update(token_ids=ids, token_logprobs=[float(x) for x in lps])
        out.append(item)
      return inp, out
    try:
      inp, data = await run_in_threadpool(run)
    except ApiError as e:
      reject(mv.name, 'bad_request', e)
    n = sum(d['num_tokens'] for d in data)
    return JSONResponse({'object': 'list', 'model': req.model, 'data': data,
                         'usage': {'prompt_tokens': len(inp) + n, 'total_tokens': len(inp) + n}},
                        headers=headers(request))

  @app.post('/tokenize', openapi_extra=_body_schema(schemas.TokenizeRequest, body_models))
  async def tokenize(request: Request):
    req = await parse(request, schemas.TokenizeRequest)
    mv = lookup(request, req.model)
    ids = await run_in_threadpool(encode, mv, req.prompt, 'prompt',
                                  req.add_special_tokens and mv.cfg.is_encdec)
    return JSONResponse({'tokens': ids, 'count': len(ids),
                         'max_model_len': mv.engine.max_prompt_len}, headers=headers(request))

  @app.post('/detokenize', openapi_extra=_body_schema(schemas.DetokenizeRequest, body_models))
  async def detokenize(request: Request):
    req = await parse(request, schemas.DetokenizeRequest)
    mv = lookup(request, req.model)
    try:
      encode(mv, req.tokens, 'tokens')   # range check
    except ApiError as e:
      reject(mv.name, 'bad_request', e)
    text = await run_in_threadpool(mv.tokenizer.decode, req.tokens)
    return JSONResponse({'prompt': text}, headers=headers(request))

  # ---- models ------------------------------------------------------------------------------------
  def model_object(name: str) -> dict:
    loaded = [m.loaded_at for m in registry.all_versions() if m.name == name and m.loaded_at]
    return {'id': name, 'object': 'model', 'created': int(min(loaded) if loaded else 0),
            'owned_by': 't5like'}

  def public_status(name: str) -> list[dict]:
    out = registry.status(name)
    for s in out:
      s['status']['error_message'] = public(s['status']['error_message'])
    return out

  @app.get('/v1/models')
  async def list_models():
    names = sorted({m.name for m in registry.all_versions() if m.serving})
    return {'object': 'list', 'data': [model_object(n) for n in names]}

  @app.get('/v1/models/{name}')
  async def get_model(name: str, request: Request):
    request.scope['t5like.model'] = name
    try:
      status = public_status(name)
    except registry_lib.ModelNotFound as e:
      raise ApiError(404, str(e), 'model', 'model_not_found') from None
    return {**model_object(name), 'ready': registry.model_ready(name)[0],
            'model_version_status': status}

  # ---- admin (authenticated; left out of /openapi.json) ------------------------------------------
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
    if not body.strip():
      return None
    req, _ = await run_in_threadpool(schemas.parse_body, schemas.LoadRequest, body,
                                     strict_fields=True)
    return req.version

  def load_failed(message: str, kind: str) -> ApiError:
    status_code, code = {'incomplete': (409, 'bundle_incomplete'),
                         'permission': (500, 'permission_denied'),
                         'invalid': (422, 'invalid_bundle')}.get(kind, (500, 'load_failed'))
    return ApiError(status_code, message, 'version', code)

  async def admin(request: Request, name: str, fn):
    check_admin(request)
    request.scope['t5like.model'] = name
    version = await version_of(request)
    try:
      status = await run_in_threadpool(fn, name, version)
    except registry_lib.ModelNotFound as e:
      raise ApiError(404, str(e), 'model', 'model_not_found') from None
    except registry_lib.LoadFailed as e:
      raise load_failed(str(e), e.kind) from None
    return {'model': name, 'model_version_status': status}

  @app.post('/admin/models/{name}/load', include_in_schema=False)
  async def admin_load(name: str, request: Request):
    return await admin(request, name, registry.load)

  @app.post('/admin/models/{name}/unload', include_in_schema=False)
  async def admin_unload(name: str, request: Request):
    return await admin(request, name, registry.unload)

  @app.post('/admin/reload', include_in_schema=False)
  async def admin_reload(request: Request):
    check_admin(request)
    failed = await run_in_threadpool(registry.reload)
    if failed:   # what was serving still is; the call that asked for the loads hears of it
      raise load_failed('; '.join(f'version {m.version} of model {m.name!r} did not load: '
                                  f'{m.error}' for m in failed), failed[0].error_kind)
    return {'models': {n: registry.status(n) for n in registry.names()}}

  # ---- health and metrics ------------------------------------------------------------------------
  @app.get('/health/live')
  async def live():
    return {'status': 'alive'}

  @app.get('/health/ready')
  @app.get('/health')
  async def ready():
    ok, why = registry.ready()
    models = {n: {'ready': ok_n, 'reason': public(why_n)}
              for n in registry.names() for ok_n, why_n in [registry.model_ready(n)]}
    return JSONResponse({'ready': ok, 'reason': public(why), 'models': models},
                        status_code=200 if ok else 503)

  @app.get('/metrics')
  async def prometheus():
    body = await run_in_threadpool(metrics.render)
    return Response(body, media_type='text/plain; version=0.0.4; charset=utf-8')

  def openapi():
    if app.openapi_schema is None:
      schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
      schema.setdefault('components', {}).setdefault('schemas', {}).update(body_models)
      app.openapi_schema = schema
    return app.openapi_schema
  app.openapi = openapi
  return app


# ---- helpers -------------------------------------------------------------------------------------

def _body_schema(cls, defs: dict) -> dict:
  extra = schemas.openapi_body(cls)
  schema = extra['requestBody']['content']['application/json']['schema']
  defs.update(schema.pop('$defs', {}))
  defs[cls.__name__] = schema
  extra['requestBody']['content']['application/json']['schema'] = {
      '$ref': f'#/components/schemas/{cls.__name__}'}
  return extra


_CHUNK_CHARS = 1 << 16


def encode_text(tok, text: str, limit: int) -> list[int] | None:
  """`tok.encode(text)`, or None once the text is certain to have more than `limit` tokens.

  A long text is first counted in whitespace-cut chunks, so a huge prompt is refused after a
  bounded amount of work and no single call holds the GIL for long (building a list of millions
  of ids would stall the event loop's thread)."""
  if len(text) <= _CHUNK_CHARS:
    return tok.encode(text)
  count, start = 0, 0
  while start < len(text):
    end = min(len(text), start + _CHUNK_CHARS)
    if end < len(text):
      cut = text.rfind(' ', start, end)
      end = cut if cut > start else end
    count += len(tok.encode(text[start:end]))
    if count > limit + 1:
      return None
    start = end
  return tok.encode(text)


def _replace(sp: engine_lib.SamplingParams, **kw) -> engine_lib.SamplingParams:
  return dataclasses.replace(sp, **kw)


def _sse(body: dict) -> str:
  return f'data: {json.dumps(body)}\n\n'


def stream_end(req, gen: Generation, chunk: dict) -> str:
  """What ends a stream: the usage chunk when the request asked for it, then DONE."""
  usage = (_sse({**chunk, 'choices': [], 'usage': gen.usage()})
           if req.stream_options and req.stream_options.include_usage else '')
  return usage + DONE


def _prompt_logprobs(mv, ids: list[int], top: int):
  """Logprob entries of a decoder-only prompt (echo with logprobs): the first token has none."""
  lps = mv.engine.score(ids[:1], ids[1:]) if len(ids) > 1 else []
  text = mv.tokenizer.decode(ids[:1])
  out = [TokenLogprob(text, None, [])]
  for i, lp in enumerate(lps, start=1):
    prev, text = text, mv.tokenizer.decode(ids[:i + 1])
    out.append(TokenLogprob(text[len(prev):], float(lp), []))
  return out
