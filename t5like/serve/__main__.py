"""`python -m t5like.serve --model_base_path=models/`: the model server.

  --model_base_path   folder of <name>/<version>/ bundles (t5like.serve.bundle)
  --host / --port     127.0.0.1:8000 by default (loopback; pass --host=0.0.0.0 to expose it)
  --version_policy    latest (with --num_latest_versions), all, or specific (with --versions)
  --admin_token       bearer token of the /admin endpoints (default: $T5LIKE_ADMIN_TOKEN; none
                      disables them)
  engine: --num_slots, --prompt_buckets, --prefill_batch_sizes, --max_new_tokens, --max_queue;
  --request_timeout_s, --drain_timeout_s (SIGTERM: not ready at once, in-flight requests drain up
  to this long, the rest end with finish_reason "abort", then the process exits 0),
  --poll_seconds (rescan the base path)
  --max_body_bytes    larger bodies are refused with 413 before parsing (4 MiB)
  --strict_fields     refuse unknown request fields (default: accept, as vLLM does)
  --metrics_names     t5like or vllm (vLLM's metric and label names)
  --http, --loop      uvicorn's HTTP parser and event loop (default: httptools and uvloop, the
                      serve extra's, the C ones; h11 / asyncio are pure Python and slower)
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import uvicorn
from absl import app as absl_app
from absl import flags

from t5like.serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from t5like.serve.registry import ModelRegistry, VersionPolicy

FLAGS = flags.FLAGS
flags.DEFINE_string('model_base_path', None, 'Folder holding <name>/<version>/ model bundles.')
flags.DEFINE_list('model_names', [], 'Serve only these model names (default: every folder).')
flags.DEFINE_string('host', '127.0.0.1', 'Address to bind (loopback by default).')
flags.DEFINE_integer('port', 8000, 'TCP port.')
flags.DEFINE_enum('version_policy', 'latest', ['latest', 'all', 'specific'], 'Versions to serve.')
flags.DEFINE_integer('num_latest_versions', 1, 'N of the latest-N policy.')
flags.DEFINE_list('versions', [], 'Versions of the specific policy, e.g. 1,3.')
flags.DEFINE_string('admin_token', None, 'Bearer token for /admin (default $T5LIKE_ADMIN_TOKEN).')
flags.DEFINE_integer('num_slots', 8, 'Concurrent decode slots per model version.')
flags.DEFINE_list('prompt_buckets', ['32', '64', '128', '256'], 'Prompt-length buckets; the '
                  'largest is the longest prompt accepted.')
flags.DEFINE_list('prefill_batch_sizes', ['1', '4', '16'], 'Batch sizes waiting requests of one '
                  'bucket are prefilled at (each compiled at start-up; none above --num_slots).')
flags.DEFINE_integer('decode_steps', 1, 'Decode steps per device call (multi-step scheduling): '
                     'less host work per token, but new requests join and cancels take effect '
                     'only between blocks of steps.', lower_bound=1)
flags.DEFINE_bool('overlap', True, 'Dispatch the next block of decode steps before taking the '
                  "last one's tokens (device and host work at the same time).")
flags.DEFINE_integer('max_new_tokens', 128, 'Largest max_tokens a request may ask for.')
flags.DEFINE_integer('max_queue', 64, 'Requests waiting for a slot before 429.')
flags.DEFINE_float('request_timeout_s', 600.0, 'Per-request timeout (submission to last token).')
flags.DEFINE_float('drain_timeout_s', 30.0, 'How long SIGTERM / unload lets requests finish.')
flags.DEFINE_float('poll_seconds', 0.0, 'Rescan the base path this often (0: only at start and '
                   'on POST /admin/reload).')
flags.DEFINE_integer('max_body_bytes', DEFAULT_MAX_BODY_BYTES, 'Larger request bodies get 413.')
flags.DEFINE_bool('strict_fields', False, 'Refuse unknown request fields with 400 (default: '
                  'accept them, named in a Warning header).')
flags.DEFINE_enum('metrics_names', 't5like', ['t5like', 'vllm'], 'Metric names on /metrics: '
                  "t5like's, or vLLM's (vllm: prefix, model_name label) for existing dashboards.")
flags.DEFINE_string('log_level', 'info', 'Python / uvicorn log level.')
flags.DEFINE_enum('http', 'auto', ['auto', 'h11', 'httptools'], "uvicorn's HTTP/1.1 "
                  'implementation (auto: httptools when installed, as the serve extra does).')
flags.DEFINE_enum('loop', 'auto', ['auto', 'asyncio', 'uvloop'], "uvicorn's event loop (auto: "
                  'uvloop when installed, as the serve extra does).')

log = logging.getLogger('t5like.serve')


def _positive_ints(name: str, values) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    out = ()
  if not out or min(out) <= 0:
    raise flags.ValidationError(f'--{name} must be a list of positive integers, got {values}')
  return out


def build_server(argv_flags=FLAGS):
  """(uvicorn.Server, registry) from the flags; the registry loads once the server runs."""
  f = argv_flags
  if not f.model_base_path:
    raise flags.ValidationError('--model_base_path is required: a folder of <name>/<version>/ '
                                'bundles')
  try:
    versions = tuple(int(v) for v in f.versions)
  except ValueError:
    raise flags.ValidationError(f'--versions must be integers, got {f.versions}') from None
  policy = VersionPolicy(f.version_policy, f.num_latest_versions, versions)
  engine_kwargs = dict(num_slots=f.num_slots,
                       prompt_buckets=_positive_ints('prompt_buckets', f.prompt_buckets),
                       prefill_batch_sizes=_positive_ints('prefill_batch_sizes',
                                                          f.prefill_batch_sizes),
                       max_new_tokens=f.max_new_tokens, max_queue=f.max_queue,
                       decode_steps=f.decode_steps, overlap=f.overlap)
  registry = ModelRegistry(f.model_base_path, policy=policy, model_names=f.model_names,
                           engine_kwargs=engine_kwargs, drain_timeout_s=f.drain_timeout_s)
  token = f.admin_token if f.admin_token is not None else os.environ.get('T5LIKE_ADMIN_TOKEN', '')
  if not token:
    log.warning('no --admin_token or T5LIKE_ADMIN_TOKEN: the /admin endpoints are disabled')
  app = create_app(registry, admin_token=token, request_timeout_s=f.request_timeout_s,
                   load_on_startup=True, max_body_bytes=f.max_body_bytes,
                   strict_fields=f.strict_fields, metrics_names=f.metrics_names)
  config = uvicorn.Config(app, host=f.host, port=f.port, log_level=f.log_level,
                          http=f.http, loop=f.loop, timeout_graceful_shutdown=5, access_log=False)
  return _DrainingServer(config, registry, f.drain_timeout_s), registry


class _DrainingServer(uvicorn.Server):
  """SIGTERM / SIGINT: not ready at once, drain the engines, then uvicorn's own shutdown."""

  def __init__(self, config, registry, drain_timeout_s):
    super().__init__(config)
    self.registry, self.drain_timeout_s = registry, drain_timeout_s
    self._draining: threading.Thread | None = None

  def handle_exit(self, sig, frame):
    if self._draining is not None:   # a second signal: stop now
      self.registry.shutting_down = True
      return super().handle_exit(sig, frame)
    log.warning('signal %s: not ready; draining in-flight requests for up to %.0fs', sig,
                self.drain_timeout_s)
    self.registry.shutting_down = True

    def drain():
      self.registry.shutdown(self.drain_timeout_s)
      self.should_exit = True
    self._draining = threading.Thread(target=drain, name='drain', daemon=True)
    self._draining.start()


def main(argv):
  if len(argv) > 1:
    raise absl_app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.basicConfig(level=FLAGS.log_level.upper(),
                      format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  server, registry = build_server()
  if FLAGS.poll_seconds > 0:
    registry.start_polling(FLAGS.poll_seconds)
  # uvicorn re-raises the signal it handled once it has shut down; a no-op handler makes a drained
  # SIGTERM exit with status 0.
  signal.signal(signal.SIGTERM, lambda *_: None)
  log.info('serving %s on http://%s:%d', registry.base_path, FLAGS.host, FLAGS.port)
  try:
    server.run()
  finally:
    registry.close()
    logging.shutdown()
  # A version still compiling in a loader thread cannot be interrupted, and tearing XLA down under
  # it at interpreter exit aborts the process: everything is drained and freed, so leave now.
  os._exit(0)


if __name__ == '__main__':
  absl_app.run(main)
