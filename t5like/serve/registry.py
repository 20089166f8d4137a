"""Versioned models under a base path, loaded and unloaded at run time (TF Serving's model manager).

  <base_path>/<name>/<version>/   one bundle (t5like.serve.bundle) per integer version folder

A `VersionPolicy` picks which versions on disk should serve: 'latest' (the N highest, TF Serving's
default with N=1), 'all', or 'specific' versions. `reload()` applies it: wanted versions are
loaded (START -> LOADING -> AVAILABLE: bundle read, params put on the device, every engine shape
compiled, engine thread started) before unwanted ones are unloaded (UNLOADING: the engine drains
its in-flight requests, up to `drain_timeout_s`, then frees its device memory -> END), so a version
switch never leaves the model without an AVAILABLE version. Admin calls `load(name, version)` pin a
version (kept whatever the policy) and `unload(name, version)` exclude it (until loaded again).
Requests go to the highest AVAILABLE version unless they name one.

A failed load never takes down what is serving: the failed version ends in END with its error
(the status of GET /v1/models/{name}, the `model_load_failures` metric), and versions the policy
would have replaced keep serving until a wanted version is AVAILABLE. A folder that failed is not
retried until its files change (or an admin load asks for it). A folder still being copied (its
`bundle.json` manifest missing, or files not yet the sizes it lists: t5like.serve.bundle) is
reported as incomplete and loaded once complete.

Readiness: the models found at the first `reload()` (or named by `model_names`) are the start-up
models; the registry is ready when each has an AVAILABLE, warmed-up version with a live engine.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import threading
import time
from typing import Any, Sequence

import jax

from t5like.infer.engine import Engine
from t5like.serve import bundle as bundle_lib
from t5like.serve.chat import ChatTemplate, ChatTemplateError

log = logging.getLogger(__name__)

START, LOADING, AVAILABLE, UNLOADING, END = 'START', 'LOADING', 'AVAILABLE', 'UNLOADING', 'END'
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


class ModelNotFound(LookupError):
  """No such model or version; the message lists what exists."""


class ModelUnavailable(RuntimeError):
  """The model exists but has no AVAILABLE version right now (loading, unloading, failed)."""


class LoadFailed(RuntimeError):
  """A version asked for by an admin call did not load; `kind` is 'incomplete' (still being
  copied), 'invalid' (a bad bundle), 'permission' (unreadable files) or 'error'."""

  def __init__(self, message: str, kind: str):
    super().__init__(message)
    self.kind = kind


def failure_kind(e: BaseException) -> str:
  if isinstance(e, bundle_lib.BundleIncomplete):
    return 'incomplete'
  if isinstance(e, (PermissionError, bundle_lib.BundleUnreadable)):
    return 'permission'
  if isinstance(e, (bundle_lib.BundleError, ChatTemplateError)):
    return 'invalid'
  return 'error'


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
  kind: str = 'latest'                  # 'latest', 'all', 'specific'
  num_latest: int = 1
  versions: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in ('latest', 'all', 'specific'):
      raise ValueError(f"version policy {self.kind!r} is not valid; choose 'latest', 'all' or "
                       "'specific'")
    if self.kind == 'latest' and self.num_latest < 1:
      raise ValueError(f'version policy latest needs num_latest >= 1, got {self.num_latest}')
    if self.kind == 'specific' and not self.versions:
      raise ValueError("version policy 'specific' needs the versions to serve (--versions=1,3)")

  def select(self, on_disk: Sequence[int]) -> set[int]:
    if self.kind == 'all':
      return set(on_disk)
    if self.kind == 'latest':
      return set(sorted(on_disk)[-self.num_latest:])
    return set(self.versions) & set(on_disk)


@dataclasses.dataclass
class ModelVersion:
  name: str
  version: int
  path: str
  state: str = START
  error: str = ''
  error_kind: str = ''
  engine: Engine | None = None
  chat_template: ChatTemplate | None = None
  tokenizer: Any = None
  cfg: Any = None
  meta: dict = dataclasses.field(default_factory=dict)
  param_bytes: int = 0
  loaded_at: float | None = None

  @property
  def serving(self) -> bool:
    return self.state == AVAILABLE and self.engine is not None and self.engine.alive

  def info(self) -> dict:
    cfg, e = self.cfg, self.engine
    if cfg is None:
      return {}
    return {'arch': cfg.arch, 'variant': cfg.name, 'weight_quant': cfg.quant.weights,
            'activation_quant': cfg.quant.activations, 'vocab_size': cfg.vocab_size,
            'd_model': cfg.d_model, 'num_decoder_layers': cfg.num_decoder_layers,
            'num_slots': e.num_slots if e else '', 'max_prompt_tokens': e.max_prompt_len if e else '',
            'max_new_tokens': e.max_new_tokens if e else ''}


class ModelRegistry:
  """The versions of every model under `base_path` (see the module docstring). Thread-safe."""

  def __init__(self, base_path: str, *, policy: VersionPolicy = VersionPolicy(),
               model_names: Sequence[str] = (), engine_kwargs: dict | None = None,
               drain_timeout_s: float = 10.0):
    self.base_path = os.path.abspath(base_path)
    if not os.path.isdir(self.base_path):
      raise FileNotFoundError(f'--model_base_path {self.base_path} is not a folder; it should hold '
                              '<name>/<version>/ bundles')
    self.policy = policy
    self.model_names = tuple(model_names)
    self.engine_kwargs = dict(engine_kwargs or {})
    self.drain_timeout_s = drain_timeout_s
    self._versions: dict[str, dict[int, ModelVersion]] = {}
    self._pinned: dict[str, set[int]] = {}
    self._excluded: dict[str, set[int]] = {}
    self._lock = threading.RLock()
    self._model_locks: dict[str, threading.Lock] = {}
    self.shutting_down = False
    self._poller: threading.Thread | None = None
    self._stop_poll = threading.Event()
    self._failed: dict[tuple[str, int], tuple] = {}    # (name, version) -> folder signature
    self.startup_models: tuple[str, ...] | None = None  # set by the first reload()
    self.load_failure_hooks: list = []                  # fn(name, kind), e.g. a metric
    self._unloaded: set[str] = set()                    # models an admin unloaded whole

  # ---- disk --------------------------------------------------------------------------------------
  def scan(self) -> dict[str, list[int]]:
    """{model name: sorted integer versions} on disk (hidden and non-integer folders skipped)."""
    out = {}
    for name in sorted(os.listdir(self.base_path)):
      folder = os.path.join(self.base_path, name)
      if not os.path.isdir(folder) or not _NAME_RE.match(name):
        continue
      if self.model_names and name not in self.model_names:
        continue
      out[name] = sorted(int(v) for v in os.listdir(folder)
                         if v.isdigit() and os.path.isdir(os.path.join(folder, v)))
    return out

  def _model_lock(self, name: str) -> threading.Lock:
    with self._lock:
      return self._model_locks.setdefault(name, threading.Lock())

  # ---- policy ------------------------------------------------------------------------------------
  def reload(self) -> list[ModelVersion]:
    """Applies the version policy (plus pins and exclusions) to what is on disk now; returns
    the versions this call tried to load and that failed."""
    on_disk = self.scan()
    first = self.startup_models is None
    if first:
      with self._lock:
        self._startup_pending = tuple(sorted(set(on_disk) | set(self.model_names)))
    failed = []
    try:
      for name, versions in on_disk.items():
        failed += self._apply(name, versions)
    finally:
      if first:
        self.startup_models = self._startup_pending
    return failed

  def is_model(self, name: str) -> bool:
    """Whether `name` is a model this registry knows (found on disk and tried)."""
    with self._lock:
      return name in self._versions

  def _signature(self, name: str, version: int) -> tuple:
    folder = os.path.join(self.base_path, name, str(version))
    try:
      return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                          for e in os.scandir(folder)))
    except OSError:
      return ()

  def _apply(self, name: str, on_disk: Sequence[int]) -> list[ModelVersion]:
    """Loads the wanted versions, then unloads the unwanted; returns the loads that failed."""
    failed = []
    with self._model_lock(name):
      if self.shutting_down:
        return failed
      with self._lock:
        pinned = self._pinned.get(name, set()) & set(on_disk)
        excluded = self._excluded.get(name, set())
        want = (self.policy.select(on_disk) | pinned) - (excluded - pinned)
        have = {v for v, mv in self._versions.get(name, {}).items() if mv.state in (LOADING, AVAILABLE)}
      for v in sorted(want - have, reverse=True):   # newest first: it takes over the traffic
        if self._failed.get((name, v)) == self._signature(name, v):
          continue   # failed before and unchanged on disk: not retried on every poll
        mv = self._load_version(name, v)
        if mv.state != AVAILABLE:
          failed.append(mv)
      with self._lock:
        versions = self._versions.get(name, {})
        # Until every wanted version is AVAILABLE, the ones it would replace keep serving.
        if any(versions.get(v) is None or versions[v].state != AVAILABLE for v in want):
          return failed
        drop = {v for v, mv in versions.items() if mv.state == AVAILABLE and v not in want}
      for v in sorted(drop):
        self._unload_version(name, v)
    return failed

  def load(self, name: str, version: int | None = None) -> list[dict]:
    """Loads `version` (pinning it), or applies the policy to `name` when version is None."""
    on_disk = self.scan()
    if name not in on_disk:
      raise ModelNotFound(f'no model {name!r} under {self.base_path}; models there: '
                          f'{sorted(on_disk)}')
    if version is not None:
      if version not in on_disk[name]:
        raise ModelNotFound(f'model {name!r} has no version {version} on disk; versions: '
                            f'{on_disk[name]}')
      with self._lock:
        self._pinned.setdefault(name, set()).add(version)
        self._excluded.setdefault(name, set()).discard(version)
      asked = {version}
    else:
      with self._lock:
        self._excluded.pop(name, None)
        self._unloaded.discard(name)
      asked = self.policy.select(on_disk[name])
    for v in asked:   # an explicit load retries a version that failed before
      self._failed.pop((name, v), None)
    self._apply(name, on_disk[name])
    with self._lock:
      failed = [self._versions[name][v] for v in sorted(asked)
                if v in self._versions.get(name, {}) and self._versions[name][v].error
                and self._versions[name][v].state in (START, END)]
    if failed:
      mv = failed[-1]
      serving = [m.version for m in self._serving(name)]
      raise LoadFailed(f'version {mv.version} of model {name!r} did not load: {mv.error} '
                       f'(serving: {serving or "nothing"})', mv.error_kind)
    return self.status(name)

  def unload(self, name: str, version: int | None = None) -> list[dict]:
    """Unloads one version, or every version of `name`; they stay unloaded until `load`."""
    with self._lock:
      known = self._versions.get(name)
    if not known:
      raise ModelNotFound(f'model {name!r} is not loaded; loaded models: {self.names()}')
    if version is not None and version not in known:
      raise ModelNotFound(f'model {name!r} has no version {version}; versions: {sorted(known)}')
    with self._model_lock(name):
      targets = [version] if version is not None else sorted(known)
      with self._lock:
        if version is None:
          self._unloaded.add(name)
        for v in targets:
          self._pinned.get(name, set()).discard(v)
          self._excluded.setdefault(name, set()).add(v)
      for v in targets:
        self._unload_version(name, v)
    return self.status(name)

  # ---- one version -------------------------------------------------------------------------------
  def _load_version(self, name: str, version: int) -> ModelVersion:
    path = os.path.join(self.base_path, name, str(version))
    mv = ModelVersion(name, version, path, state=LOADING)
    with self._lock:
      self._versions.setdefault(name, {})[version] = mv
    t0 = time.monotonic()
    signature = self._signature(name, version)
    try:
      bundle_lib.check_complete(path)
      b = bundle_lib.load_bundle(path)
      template = ChatTemplate.for_bundle(path)
      params = jax.device_put(b.params, jax.devices()[0])
      mv.param_bytes = int(sum(x.nbytes for x in jax.tree.leaves(params)))
      del b.params
      engine = Engine(params, b.cfg, name=f'{name}:{version}', **self.engine_kwargs)
      del params
      engine.start()   # warm-up: every prefill bucket, insert and generate shape compiled here
      mv.cfg, mv.tokenizer, mv.meta, mv.engine = b.cfg, b.tokenizer, b.meta, engine
      mv.chat_template = template
      mv.loaded_at = time.time()
      mv.state = AVAILABLE
      log.info('model %s version %d AVAILABLE (%s, %.1f MB params, loaded in %.1fs)', name,
               version, b.cfg.name, mv.param_bytes / 1e6, time.monotonic() - t0)
    except Exception as e:   # a bad bundle fails its own version only
      mv.error = f'{type(e).__name__}: {e}'
      mv.error_kind = failure_kind(e)
      mv.state = START if mv.error_kind == 'incomplete' else END   # START: waits for the copy
      if mv.engine is not None:
        mv.engine.close()
        mv.engine = None
      self._failed[(name, version)] = signature
      log.error('model %s version %d failed to load: %s', name, version, mv.error)
      for hook in self.load_failure_hooks:
        hook(name, mv.error_kind)
    return mv

  def _unload_version(self, name: str, version: int) -> None:
    with self._lock:
      mv = self._versions.get(name, {}).get(version)
      if mv is None or mv.state not in (AVAILABLE, LOADING):
        return
      mv.state = UNLOADING
    engine = mv.engine
    if engine is not None:
      engine.shutdown(drain_timeout_s=self.drain_timeout_s)   # in-flight requests finish first
      mv.engine = None
      engine.close()                                          # frees params and KV cache
    del engine
    gc.collect()
    mv.state = END
    log.info('model %s version %d unloaded', name, version)

  # ---- lookups -----------------------------------------------------------------------------------
  def names(self) -> list[str]:
    with self._lock:
      return sorted(self._versions)

  def get(self, name: str, version: int | None = None) -> ModelVersion:
    """The version serving `name` (the highest AVAILABLE one unless `version` is given)."""
    with self._lock:
      versions = self._versions.get(name)
      if not versions:
        raise ModelNotFound(f'model {name!r} does not exist; available models: '
                            f'{[n for n in self._versions if self._serving(n)]}')
      if version is not None:
        mv = versions.get(version)
        if mv is None:
          raise ModelNotFound(f'model {name!r} has no version {version}; versions: '
                              f'{sorted(versions)}')
        if not mv.serving:
          raise ModelUnavailable(f'version {version} of model {name!r} is {mv.state}, not '
                                 'AVAILABLE')
        return mv
      serving = self._serving(name)
      if not serving:
        states = {v: m.state for v, m in versions.items()}
        raise ModelUnavailable(f'model {name!r} has no AVAILABLE version (versions: {states})')
      return serving[-1]

  def _serving(self, name: str) -> list[ModelVersion]:
    return [m for _, m in sorted(self._versions.get(name, {}).items()) if m.serving]

  def status(self, name: str) -> list[dict]:
    """TF Serving's model_version_status for `name`, newest first."""
    with self._lock:
      versions = self._versions.get(name)
      if not versions:
        raise ModelNotFound(f'model {name!r} does not exist; models: {sorted(self._versions)}')
      return [{'version': str(v), 'state': m.state,
               'status': {'error_code': 'OK' if not m.error else 'UNKNOWN',
                          'error_message': m.error}}
              for v, m in sorted(versions.items(), reverse=True)]

  def all_versions(self) -> list[ModelVersion]:
    with self._lock:
      return [m for n in sorted(self._versions) for _, m in sorted(self._versions[n].items())]

  def snapshot(self) -> list[dict]:
    """Live per-version values for the metrics collector."""
    out = []
    for m in self.all_versions():
      e = m.engine
      stats = None
      if e is not None and m.state in (AVAILABLE, UNLOADING):
        try:
          stats = e.stats()
        except Exception:   # the engine was closed between the read and the call
          stats = None
      out.append({'model': m.name, 'version': m.version, 'state': m.state, 'info': m.info(),
                  'engine': stats, 'param_bytes': m.param_bytes})
    return out

  def model_ready(self, name: str) -> tuple[bool, str]:
    """(ready, why) of one model: a version AVAILABLE, warmed up, its engine thread alive."""
    with self._lock:
      versions = dict(self._versions.get(name, {}))
    ok = [v for v, m in versions.items() if m.serving and m.engine.ready]
    if ok:
      return True, f'version(s) {sorted(ok)} AVAILABLE'
    states = {v: m.state + (f' ({m.error})' if m.error else '') for v, m in versions.items()}
    return False, f'no AVAILABLE version (versions: {states or "none loaded yet"})'

  def ready(self) -> tuple[bool, str]:
    """(ready, why): not shutting down, the initial load done, and every start-up model ready."""
    if self.shutting_down:
      return False, 'shutting down'
    if self.startup_models is None:
      return False, 'the initial load has not finished'
    if not self.startup_models:
      return False, 'no models were found under the base path at start-up'
    with self._lock:   # a model an admin unloaded on purpose is no longer required
      required = [n for n in self.startup_models if n not in self._unloaded]
    states = {n: self.model_ready(n) for n in set(required) | set(self.names())}
    not_ready = {n: states[n][1] for n in required if not states[n][0]}
    if not_ready:
      return False, f'model(s) not ready: {not_ready}'
    if not any(ok for ok, _ in states.values()):
      return False, 'no model is AVAILABLE (all unloaded)'
    return True, f'{sum(ok for ok, _ in states.values())} model(s) ready'

  # ---- life cycle --------------------------------------------------------------------------------
  def start_polling(self, every_s: float) -> None:
    """Re-applies the policy every `every_s` seconds (new versions on disk get served)."""
    def loop():
      while not self._stop_poll.wait(every_s):
        try:
          self.reload()
        except Exception as e:   # a broken folder must not stop the poller
          log.error('reload of %s failed: %s', self.base_path, e)
    self._poller = threading.Thread(target=loop, name='model-poller', daemon=True)
    self._poller.start()

  def shutdown(self, drain_timeout_s: float | None = None) -> None:
    """Not ready from now on; every engine drains up to the timeout (in parallel), then aborts
    what is left with finish reason 'abort' and frees its memory."""
    self.shutting_down = True
    self._stop_poll.set()
    timeout = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
    threads = []
    for m in self.all_versions():
      if m.engine is not None and m.state in (AVAILABLE, LOADING):
        t = threading.Thread(target=m.engine.shutdown, args=(timeout,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
      t.join()

  def close(self) -> None:
    self.shutting_down = True
    self._stop_poll.set()
    for m in self.all_versions():
      engine, m.engine = m.engine, None
      if engine is not None:
        engine.close()
      m.state = END
