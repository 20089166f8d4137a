"""The HTTP protocol: request bodies as pydantic models, OpenAI's error shape, hostile-body checks.

Bodies are parsed here, off the event loop (`parse_body` runs in a worker thread): the JSON text is
checked before pydantic sees it (invalid UTF-8, lone surrogates in any string, NaN / Infinity
literals, integers of more than 4300 digits, nesting deeper than `MAX_DEPTH`), then validated by
the request model. Numbers the device cannot hold (ids and counts are int32 on the device) are out
of range, so `top_k` = 2**31 is a 400, never an overflow. Unknown fields are accepted (vLLM's
default; the response names them in a `Warning` header) or, with `strict`, rejected with a 400.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` (OpenAI's
shape) through `ApiError` and `error_response`.
"""
from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

INT32_MAX = 2 ** 31 - 1
MAX_DEPTH = 32            # JSON nesting; OpenAI bodies need at most 5
MAX_STOP = 4
MAX_LOGPROBS = 20         # top-N alternatives per token (OpenAI's chat limit)
MAX_N = 16                # choices per prompt
MAX_BATCH = 64            # prompts per request

ERROR_TYPES = {400: 'invalid_request_error', 401: 'authentication_error', 403: 'permission_error',
               404: 'not_found_error', 405: 'invalid_request_error', 409: 'conflict_error',
               413: 'invalid_request_error', 422: 'invalid_request_error', 429: 'rate_limit_error',
               500: 'server_error', 503: 'service_unavailable', 504: 'timeout'}


class ApiError(Exception):
  """An HTTP error with OpenAI's body; `param` names the offending field."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': ERROR_TYPES.get(self.status, 'error'),
                      'param': self.param, 'code': self.code}}


# ---- field types ---------------------------------------------------------------------------------

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]
Prompt = Union[Annotated[str, Field(min_length=1)], Annotated[list[TokenId], Field(min_length=1)],
               Annotated[list[Annotated[str, Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_BATCH)],
               Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_BATCH)]]


class _Body(BaseModel):
  # strict: '5' is not an int and true is not 1; extra fields are kept so the app can warn or
  # refuse (the strictness flag); NaN / Infinity never validate.
  model_config = ConfigDict(strict=True, extra='allow', allow_inf_nan=False)


class StreamOptions(_Body):
  include_usage: bool = False
  continuous_usage_stats: bool = False


class _Sampling(_Body):
  """Fields completions and chat share."""
  model: Annotated[str, Field(min_length=1, max_length=512)]
  temperature: Annotated[float, Field(ge=0, le=2)] | None = None
  top_p: Annotated[float, Field(gt=0, le=1)] | None = None
  top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None   # extension; 0 or -1: off
  n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
  stop: Union[Annotated[str, Field(min_length=1)],
              Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)],
              None] = None
  stop_token_ids: list[TokenId] | None = None                       # extension
  seed: Annotated[int, Field(ge=0, le=2 ** 63 - 1)] | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: Annotated[str, Field(max_length=512)] | None = None
  timeout: Annotated[float, Field(gt=0)] | None = None             # extension, seconds
  return_token_ids: bool = False                                    # extension
  # Accepted at their neutral values only (anything else: 400 naming the field).
  presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
  frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
  logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None


class CompletionRequest(_Sampling):
  """POST /v1/completions (OpenAI's legacy completions)."""
  prompt: Prompt
  max_tokens: Count | None = 16
  echo: bool = False
  logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
  best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
  suffix: Annotated[str, Field(max_length=0)] | None = None


class TextPart(_Body):
  type: Literal['text']
  text: str


class ChatMessage(_Body):
  role: Literal['system', 'developer', 'user', 'assistant', 'tool']
  content: Union[str, list[TextPart], None] = None
  name: Annotated[str, Field(max_length=256)] | None = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return ''.join(p.text for p in self.content)
    return self.content or ''


class ChatCompletionRequest(_Sampling):
  """POST /v1/chat/completions."""
  messages: Annotated[list[ChatMessage], Field(min_length=1)]
  max_tokens: Count | None = None
  max_completion_tokens: Count | None = None
  logprobs: bool = False
  top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
  add_generation_prompt: bool = True                                # extension (vLLM's)

  @field_validator('top_logprobs')
  @classmethod
  def _needs_logprobs(cls, v, info):
    if v and not info.data.get('logprobs'):
      raise ValueError('top_logprobs needs logprobs=true')
    return v


class ScoreRequest(_Body):
  """POST /v1/score: log-likelihood of each target given the input (rank classification,
  encoder-decoder evaluation). Text targets of an encoder-decoder model end with EOS unless
  add_eos is false."""
  model: Annotated[str, Field(min_length=1, max_length=512)]
  input: Union[Annotated[str, Field(min_length=1)], Annotated[list[TokenId], Field(min_length=1)]]
  targets: Annotated[list[Union[Annotated[str, Field(min_length=1)],
                                Annotated[list[TokenId], Field(min_length=1)]]],
                     Field(min_length=1, max_length=64)]
  add_eos: bool | None = None
  return_token_logprobs: bool = False


class TokenizeRequest(_Body):
  model: Annotated[str, Field(min_length=1, max_length=512)]
  prompt: str
  add_special_tokens: bool = True      # EOS after the text of an encoder-decoder model


class DetokenizeRequest(_Body):
  model: Annotated[str, Field(min_length=1, max_length=512)]
  tokens: list[TokenId]


class LoadRequest(_Body):
  model_config = ConfigDict(strict=True, extra='forbid')
  version: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, ScoreRequest, TokenizeRequest,
                  DetokenizeRequest)


# ---- parsing -------------------------------------------------------------------------------------

def _reject_constant(name: str):
  raise ValueError(f'{name} is not valid JSON (numbers must be finite)')


def _check_tree(data: Any) -> None:
  """Depth and strings of a parsed body, iteratively (no recursion on hostile input)."""
  stack = [(data, 1, '')]
  while stack:
    node, depth, where = stack.pop()
    if depth > MAX_DEPTH:
      raise ApiError(400, f'the request body is nested deeper than {MAX_DEPTH} levels',
                     where or None)
    if isinstance(node, dict):
      for k, v in node.items():
        _check_str(k, where)
        stack.append((v, depth + 1, f'{where}.{k}' if where else k))
    elif isinstance(node, list):
      stack.extend((v, depth + 1, where) for v in node)
    elif isinstance(node, str):
      _check_str(node, where)


def _check_str(s: str, where: str) -> None:
  try:
    s.encode('utf-8')
  except UnicodeEncodeError as e:
    raise ApiError(400, f'invalid Unicode in {where or "the request body"}: a lone surrogate at '
                   f'character {e.start}; send valid UTF-8 text', where or None) from None


def load_json(body: bytes) -> Any:
  """The parsed body, or ApiError(400) naming what is wrong with it."""
  if not body:
    raise ApiError(400, 'the request body is empty; send a JSON object')
  try:
    data = json.loads(body, parse_constant=_reject_constant)
  except RecursionError:
    raise ApiError(400, f'the request body is nested too deeply (limit {MAX_DEPTH} levels)') \
        from None
  except UnicodeDecodeError as e:
    raise ApiError(400, f'the request body is not valid UTF-8 ({e.reason} at byte {e.start})') \
        from None
  except ValueError as e:   # JSONDecodeError, over-long integer literals, NaN / Infinity
    raise ApiError(400, f'the request body is not valid JSON: {str(e)[:200]}') from None
  _check_tree(data)
  return data


_TYPE_TAGS = {'str', 'int', 'float', 'bool', 'dict', 'list', 'none', 'is-instance'}


def _loc(err: dict) -> str | None:
  """The field path of a validation error, without pydantic's union-member tags."""
  parts = [str(p) for p in err.get('loc', ()) if not isinstance(p, int)]
  parts = [p for p in parts if '[' not in p and p not in _TYPE_TAGS
           and not p.startswith(('constrained-', 'function-', 'json-or-python', 'lax-or-strict'))]
  return '.'.join(parts) if parts else None


def validate(model_cls: type[BaseModel], data: Any, *, strict_fields: bool = False):
  """(request, unknown field names). ApiError(400) names the first bad field."""
  if not isinstance(data, dict):
    raise ApiError(400, f'the request body must be a JSON object, got {type(data).__name__}')
  try:
    req = model_cls.model_validate(data)
  except ValidationError as e:
    errs = e.errors(include_url=False)
    first = errs[0]
    param = _loc(first)
    if first['type'] == 'missing':
      msg = f'{param} is required'
    else:
      got = first.get('input')
      shown = repr(got) if not isinstance(got, (dict, list, str)) or len(got) < 40 else \
          f'{type(got).__name__} of length {len(got)}'
      msg = f'{param or "body"}: {first["msg"]} (got {shown})'
    if len(errs) > 1:
      msg += f'; and {len(errs) - 1} more problem(s)'
    raise ApiError(400, msg, param) from None
  unknown = _unknown(req)
  if unknown and strict_fields:
    raise ApiError(400, f'unknown field(s) {unknown}; supported fields: '
                   f'{sorted(model_cls.model_fields)}', unknown[0])
  return req, unknown


def _holds_model(annotation) -> bool:
  if isinstance(annotation, type) and issubclass(annotation, BaseModel):
    return True
  return any(_holds_model(a) for a in get_args(annotation))


@functools.cache
def _model_fields(cls: type[BaseModel]) -> tuple[str, ...]:
  """Fields whose type can hold a nested model: the others (a prompt of token ids) need no walk."""
  return tuple(n for n, f in cls.model_fields.items() if _holds_model(f.annotation))


def _unknown(req: BaseModel, prefix: str = '') -> list[str]:
  out = [f'{prefix}{k}' for k in (req.model_extra or {})]
  for name in _model_fields(type(req)):
    v = getattr(req, name)
    items = v if isinstance(v, list) else [v]
    for x in items:
      if isinstance(x, BaseModel):
        out += _unknown(x, f'{prefix}{name}.')
  return sorted(set(out))


def parse_body(model_cls: type[BaseModel], body: bytes, *, strict_fields: bool = False):
  """Bytes to a validated request: `load_json` then `validate` (run it in a worker thread)."""
  return validate(model_cls, load_json(body), strict_fields=strict_fields)


def openapi_body(model_cls: type[BaseModel]) -> dict:
  """`openapi_extra` of a route whose body is parsed by `parse_body` (refs into components)."""
  schema = model_cls.model_json_schema(ref_template='#/components/schemas/{model}')
  return {'requestBody': {'required': True,
                          'content': {'application/json': {'schema': schema}}}}
