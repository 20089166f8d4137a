"""The ASGI layers around the app: a body-size limit before parsing, a count of every response
by model / route / status, and routes that turn an unexpected exception into that request's 500
in OpenAI's error shape."""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from t5like.serve.metrics import OTHER_MODEL, ServerMetrics
from t5like.serve.schemas import ApiError

log = logging.getLogger(__name__)


def error_response(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=e.headers)



class BodyLimit:
  """Refuses bodies over `limit` bytes with 413 before anything parses them (Content-Length
  checked first; a chunked body is counted as it arrives). The body is then replayed to the app;
  later `receive` calls go to the server (disconnect detection)."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http' or scope['method'] in ('GET', 'HEAD', 'OPTIONS'):
      return await self.app(scope, receive, send)
    too_big = ApiError(413, f'the request body is over the server\'s limit of {self.limit} bytes '
                       '(--max_body_bytes); send a smaller body', None, 'body_too_large')
    declared = dict(scope.get('headers') or ()).get(b'content-length')
    if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
      if not declared.isdigit():
        too_big = ApiError(400, 'Content-Length is not a number')
      return await error_response(too_big)(scope, receive, send)
    chunks, size = [], 0
    while True:
      msg = await receive()
      if msg['type'] == 'http.disconnect':
        return
      size += len(msg.get('body', b''))
      if size > self.limit:
        return await error_response(too_big)(scope, receive, send)
      chunks.append(msg.get('body', b''))
      if not msg.get('more_body'):
        break
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {'type': 'http.request', 'body': b''.join(chunks), 'more_body': False}
      return await receive()
    return await self.app(scope, replay, send)


class ResponseCounting:
  """Counts every response by model, version, route and status. The model label is a loaded
  model's name or OTHER_MODEL: no client string reaches a label."""

  def __init__(self, app, metrics: ServerMetrics, is_model):
    self.app, self.metrics, self.is_model = app, metrics, is_model

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
      model = scope.get('t5like.model', '')
      if model and not self.is_model(model):
        model = OTHER_MODEL
      self.metrics.requests.labels(model, scope.get('t5like.version', ''), endpoint,
                                   str(status.get('code', 500))).inc()


class GuardedRoute(APIRoute):
  """Turns an unexpected exception inside a route into that request's 500 (OpenAI's shape); the
  connection and the server carry on."""

  def get_route_handler(self):
    handler = super().get_route_handler()

    async def guarded(request: Request):
      try:
        return await handler(request)
      except (ApiError, StarletteHTTPException, RequestValidationError):
        raise
      except Exception as e:
        log.exception('request failed')
        raise ApiError(500, f'internal error: {type(e).__name__}: {e}') from None
    return guarded
