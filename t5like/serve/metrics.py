"""Prometheus metrics of the server (prometheus_client; base units, `_total` counters).

Each `ServerMetrics` owns its own `CollectorRegistry`, so several servers (tests) can live in one
process. Latencies and token counts are observed by `RequestTimer` from the engine's events;
gauges (running / waiting requests, slots, KV-cache use, model info and state, process CPU and
memory) are read at scrape time by a collector, never frozen at start-up. The table of every
metric is in BUILD.md, "## Serving".

`names='vllm'` exposes the same metrics under vLLM's names (`vllm:` prefix, the model label called
`model_name`, e.g. `vllm:num_requests_running`, `vllm:request_success_total{finished_reason}`), so
dashboards built for vLLM work unchanged. Model labels only ever hold the name of a model the
registry knows; any other client-supplied name is counted under `OTHER_MODEL`.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

PREFIX = 't5like'
OTHER_MODEL = '_other'
# Our base name -> vLLM's (where they differ); the rest keep their base name under `vllm:`.
_VLLM_NAMES = {'requests_running': 'num_requests_running',
               'requests_waiting': 'num_requests_waiting',
               'kv_cache_usage_ratio': 'kv_cache_usage_perc', 'request_finish': 'request_success'}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MV = ('model', 'version')


class _Names:
  """Metric and label names of one naming scheme ('t5like' or 'vllm')."""

  def __init__(self, scheme: str):
    if scheme not in ('t5like', 'vllm'):
      raise ValueError(f"metric names {scheme!r} are not known; choose 't5like' or 'vllm'")
    self.vllm = scheme == 'vllm'
    self.mv = ('model_name', 'version') if self.vllm else MV
    self.model = self.mv[0]

  def __call__(self, base: str) -> str:
    return f'vllm:{_VLLM_NAMES.get(base, base)}' if self.vllm else f'{PREFIX}_{base}'

  def reason(self) -> str:
    return 'finished_reason' if self.vllm else 'reason'


class _LiveCollector:
  """Gauges read at scrape time from the registry's engines and from the process."""

  def __init__(self, snapshot: Callable[[], Iterable[dict]], names: _Names):
    self._snapshot = snapshot
    self._proc = psutil.Process()
    self._n = names

  def collect(self):
    n, MV = self._n, self._n.mv
    running = GaugeMetricFamily(n('requests_running'), 'Requests in a decode slot.', labels=MV)
    waiting = GaugeMetricFamily(n('requests_waiting'), 'Requests queued for a slot.', labels=MV)
    slots = GaugeMetricFamily(n('slots_in_use'), 'Decode slots holding a request.', labels=MV)
    total = GaugeMetricFamily(n('slots'), 'Decode slots of the engine.', labels=MV)
    kv = GaugeMetricFamily(n('kv_cache_usage_ratio'),
                           'Fraction of the KV-cache positions holding live tokens.', labels=MV)
    state = GaugeMetricFamily(n('model_state'), '1 for the version\'s current state.',
                              labels=MV + ('state',))
    pbytes = GaugeMetricFamily(n('model_param_bytes'), 'Bytes of the loaded parameters.',
                               labels=MV)
    steps = CounterMetricFamily(n('engine_steps'), 'Batched decode steps run.', labels=MV)
    info = InfoMetricFamily(n('model'), 'Loaded model versions and their configuration.',
                            labels=MV)
    for s in self._snapshot():
      mv = (s['model'], str(s['version']))
      state.add_metric(mv + (s['state'],), 1)
      info.add_metric(mv, {k: str(v) for k, v in s['info'].items()})
      e = s.get('engine')
      if e is None:
        continue
      running.add_metric(mv, e['running'])
      waiting.add_metric(mv, e['waiting'])
      slots.add_metric(mv, e['slots_in_use'])
      total.add_metric(mv, e['num_slots'])
      kv.add_metric(mv, e['kv_cache_usage'])
      steps.add_metric(mv, e['steps'])
      pbytes.add_metric(mv, s['param_bytes'])
    yield from (running, waiting, slots, total, kv, state, pbytes, steps, info)
    with self._proc.oneshot():
      cpu = self._proc.cpu_times()
      mem = self._proc.memory_info()
      threads = self._proc.num_threads()
    c = CounterMetricFamily('process_cpu_seconds', 'User and system CPU time of the process.')
    c.add_metric([], cpu.user + cpu.system)
    yield c
    yield GaugeMetricFamily('process_resident_memory_bytes', 'Resident set size.', value=mem.rss)
    yield GaugeMetricFamily('process_virtual_memory_bytes', 'Virtual memory size.', value=mem.vms)
    yield GaugeMetricFamily('process_threads', 'OS threads of the process.', value=threads)
    yield GaugeMetricFamily('process_start_time_seconds', 'Start time (Unix seconds).',
                            value=self._proc.create_time())


class ServerMetrics:
  """All server metrics on one registry; `render()` is the /metrics body."""

  def __init__(self, snapshot: Callable[[], Iterable[dict]] = lambda: (), names: str = 't5like'):
    n = self.names = _Names(names)
    MV = n.mv
    r = self.registry = CollectorRegistry(auto_describe=True)
    self.requests = Counter(n('requests'), 'Finished HTTP requests by status code.',
                            MV + ('endpoint', 'status'), registry=r)
    self.finished = Counter(n('request_finish'), 'Generations by finish reason.',
                            MV + (n.reason(),), registry=r)
    self.rejections = Counter(n('rejections'), 'Requests refused before generation.',
                              (n.model, 'reason'), registry=r)
    self.load_failures = Counter(n('model_load_failures'), 'Model versions that failed to load, '
                                 'by kind (invalid, incomplete, permission, error).',
                                 (n.model, 'kind'), registry=r)
    self.prompt_tokens = Counter(n('prompt_tokens'), 'Prompt tokens of admitted requests.',
                                 MV, registry=r)
    self.generation_tokens = Counter(n('generation_tokens'), 'Generated tokens.', MV, registry=r)
    self.ttft = Histogram(n('time_to_first_token_seconds'),
                          'Submission to first generated token.', MV, buckets=_LATENCY_BUCKETS,
                          registry=r)
    self.itl = Histogram(n('inter_token_latency_seconds'),
                         'Time between consecutive generated tokens.', MV, buckets=_ITL_BUCKETS,
                         registry=r)
    self.e2e = Histogram(n('e2e_request_latency_seconds'),
                         'Submission to the last token of a generation.', MV,
                         buckets=_LATENCY_BUCKETS, registry=r)
    self.queue_time = Histogram(n('request_queue_time_seconds'),
                                'Submission to admission into a decode slot.', MV,
                                buckets=_LATENCY_BUCKETS, registry=r)
    self.prompt_hist = Histogram(n('request_prompt_tokens'), 'Prompt tokens per request.',
                                 MV, buckets=_TOKEN_BUCKETS, registry=r)
    self.gen_hist = Histogram(n('request_generation_tokens'),
                              'Generated tokens per request.', MV, buckets=_TOKEN_BUCKETS,
                              registry=r)
    r.register(_LiveCollector(snapshot, n))

  def render(self) -> bytes:
    return generate_latest(self.registry)

  def timer(self, model: str, version) -> 'RequestTimer':
    return RequestTimer(self, model, str(version))


class RequestTimer:
  """Observes one generation's latencies; `add_tokens()` / `finish()` run on the engine thread."""

  def __init__(self, m: ServerMetrics, model: str, version: str):
    self.m, self.labels = m, (model, version)
    self._itl = m.itl.labels(model, version)    # looked up once, not per token
    self.last_token_at: float | None = None
    self.tokens = 0

  def add_tokens(self, n: int) -> None:
    """`n` tokens arrived together (one device call): the first after the gap since the last
    token, the others with none."""
    now = time.monotonic()
    if self.last_token_at is not None:
      self._itl.observe(now - self.last_token_at)
    for _ in range(n - 1):
      self._itl.observe(0.0)
    self.last_token_at = now
    self.tokens += n

  def finish(self, request, reason: str, tokens: int | None = None) -> None:
    """Records a finished generation; `tokens` is how many it returned (default: all seen)."""
    m, lb = self.m, self.labels
    tokens = self.tokens if tokens is None else tokens
    m.finished.labels(*lb, reason.split(':', 1)[0]).inc()
    m.prompt_tokens.labels(*lb).inc(len(request.prompt_ids))
    m.prompt_hist.labels(*lb).observe(len(request.prompt_ids))
    m.generation_tokens.labels(*lb).inc(tokens)
    m.gen_hist.labels(*lb).observe(tokens)
    if request.started_at is not None:
      m.queue_time.labels(*lb).observe(request.started_at - request.submitted_at)
    if request.first_token_at is not None:
      m.ttft.labels(*lb).observe(request.first_token_at - request.submitted_at)
    end = request.finished_at or time.monotonic()
    m.e2e.labels(*lb).observe(end - request.submitted_at)
