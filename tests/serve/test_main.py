"""`python -m t5like.serve` flags reach uvicorn: the HTTP implementation and event loop. The
module's flags are read from their definitions (other test modules define required flags of their
own in the same global FLAGS, so it is not parsed here)."""
import types

import pytest
from absl import flags

from t5like.serve import __main__ as serve_main


def _serve_flags(**values):
  defined = flags.FLAGS.get_key_flags_for_module(serve_main)
  return types.SimpleNamespace(**{**{f.name: f.default for f in defined}, **values})


@pytest.mark.parametrize('http,loop', [('auto', 'auto'), ('h11', 'asyncio'),
                                       ('httptools', 'uvloop')])
def test_http_and_loop_flags_reach_uvicorn(tmp_path, http, loop):
  for name, value in (('http', http), ('loop', loop)):
    assert flags.FLAGS[name].parser.parse(value) == value
  server, registry = serve_main.build_server(
      _serve_flags(model_base_path=str(tmp_path), admin_token='t', http=http, loop=loop))
  registry.close()
  assert (server.config.http, server.config.loop) == (http, loop)


def test_unknown_http_implementation_is_refused():
  with pytest.raises(ValueError, match=r'one of <auto\|h11\|httptools>'):
    flags.FLAGS['http'].parser.parse('h2')


def test_engine_flags_reach_the_registry(tmp_path):
  server, registry = serve_main.build_server(
      _serve_flags(model_base_path=str(tmp_path), admin_token='t', decode_steps=8, overlap=False))
  registry.close()
  assert registry.engine_kwargs['decode_steps'] == 8
  assert registry.engine_kwargs['overlap'] is False
  with pytest.raises(ValueError, match='not a positive integer'):
    flags.FLAGS['decode_steps'].parser.parse('0')
