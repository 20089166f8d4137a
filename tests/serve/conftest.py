"""Fixtures: a tokenizer, a base path of tiny model bundles, a live server on a loopback port."""
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.data import corpus
from t5like.data import tokenizer as tokenizer_lib
from t5like.infer import decode
from t5like.models.random_weights import random_params
from t5like.serve import bundle
from t5like.serve.app import create_app
from t5like.serve.registry import ModelRegistry

ENGINE_KW = dict(num_slots=4, prompt_buckets=(16, 32), max_new_tokens=24, max_queue=6)
ADMIN_TOKEN = 'test-admin-token'
MAX_BODY = 8 << 20
# Prompts whose greedy continuations differ (asserted in `base_path`): a slot mix-up or a wrong
# cross-attention row shows up as a wrong token.
PROMPTS = [[5, 6, 7, 1], [9, 3, 4, 10, 11, 1], [100, 200, 1], [42, 43, 44, 45, 1]]


def tiny_params(name='t5_tiny', seed=0):
  """Random weights (not init's: a fresh tiny T5 greedy-decodes the same token for every
  prompt) under which different prompts have different greedy outputs."""
  cfg = get_variant(name)
  return jax.device_get(random_params(cfg, seed=seed, embed_std=0.3, std=0.2)), cfg


def assert_outputs_differ(params, cfg, n=6):
  prompts = np.zeros((len(PROMPTS), 8), np.int32)
  for i, p in enumerate(PROMPTS):
    p = p if cfg.is_encdec else p[:-1]
    prompts[i, :len(p)] = p
  toks = np.asarray(decode.greedy(params, cfg, prompts, n).tokens)
  assert len({tuple(t) for t in toks}) == len(PROMPTS), toks
  return toks


@pytest.fixture(scope='session')
def serve_tokenizer():
  """A 400-piece SentencePiece model (500 ids with the sentinels; t5_tiny has 512)."""
  docs = corpus.shakespeare_documents()[:2]
  return tokenizer_lib.train_tokenizer(docs, 400, max_sentences=2000)


@pytest.fixture(scope='session')
def base_path(tmp_path_factory, serve_tokenizer):
  """tiny/1 and tiny/2 (t5_tiny, two seeds) and dec/1 (decoder_tiny)."""
  root = tmp_path_factory.mktemp('models')
  for name, variant, version, seed in (('tiny', 't5_tiny', 1, 0), ('tiny', 't5_tiny', 2, 1),
                                       ('dec', 'decoder_tiny', 1, 2)):
    params, cfg = tiny_params(variant, seed)
    assert_outputs_differ(params, cfg)
    bundle.export_bundle(params, cfg, serve_tokenizer, str(root / name / str(version)))
  return root


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class ServerThread:
  """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

  def __init__(self, app):
    import uvicorn
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=self.port,
                                                log_level='warning', access_log=False))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    self.thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      if time.monotonic() > deadline or not self.thread.is_alive():
        raise RuntimeError('uvicorn did not start')
      time.sleep(0.02)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(timeout=30)


def wait_until(fn, timeout=120.0, every=0.05):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if fn():
      return True
    time.sleep(every)
  raise AssertionError(f'condition not met within {timeout}s')


@pytest.fixture(scope='session')
def live(base_path):
  """One server for the session over `base_path` with the latest-1 policy (tiny:2 and dec:1
  AVAILABLE). Tests that load or unload versions use their own (`admin_live`)."""
  yield from _serve(base_path)


@pytest.fixture(scope='module')
def admin_live(base_path):
  yield from _serve(base_path)


@pytest.fixture(scope='module')
def blocks_live(base_path):
  """A server like `live` whose engines decode 3 steps per device call, one block at a time."""
  yield from _serve(base_path, decode_steps=3, overlap=False)


def _serve(base_path, **engine_kw):
  registry = ModelRegistry(str(base_path), engine_kwargs={**ENGINE_KW, **engine_kw},
                           drain_timeout_s=5.0)
  registry.reload()
  app = create_app(registry, admin_token=ADMIN_TOKEN, request_timeout_s=60.0,
                   max_body_bytes=MAX_BODY)
  with ServerThread(app) as srv:
    srv.registry = registry
    srv.client = httpx.Client(base_url=srv.url, timeout=60)
    yield srv
    srv.client.close()
  registry.close()
