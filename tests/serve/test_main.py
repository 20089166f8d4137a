"""`python -m t5like.serve` flags reach uvicorn: the HTTP implementation and event loop."""
from absl import flags
from absl.testing import flagsaver

from t5like.serve import __main__ as serve_main


def test_http_and_loop_flags_reach_uvicorn(tmp_path):
  argv = ['serve', f'--model_base_path={tmp_path}', '--admin_token=t']
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    server, registry = serve_main.build_server()
    registry.close()
    assert (server.config.http, server.config.loop) == ('auto', 'auto')
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + ['--http=h11', '--loop=asyncio'])
    server, registry = serve_main.build_server()
    registry.close()
    assert (server.config.http, server.config.loop) == ('h11', 'asyncio')
