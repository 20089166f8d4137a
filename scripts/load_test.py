"""Load test of the model server (loopback only, bounded request count and time), JSON output.

  python scripts/load_test.py --variant=t5_tiny --out=experiments/results/serving/load_test.json
  python scripts/load_test.py --model_base_path=models/ --model=tiny          # starts a server
  python scripts/load_test.py --url=http://127.0.0.1:8000 --model=tiny        # uses a running one

`--variant` exports a bundle of that variant (random weights under which greedy outputs depend on
the prompt, a small tokenizer trained on the bundled corpus) to a temporary base path and serves
it. The server starts fresh, then:

1. fresh vs after a burst: one greedy client (`--probe_requests` requests) on the fresh server
   (after the same probe once unmeasured: a process's first requests pay one-off costs, and greedy
   requests leave no slot sampling), then twice a burst of sampled traffic (16 clients) followed
   by the same greedy probe; the TPOT ratio is the mean of the after-burst probes' p50 TPOT over
   the fresh one's (1.0: idle slots that last held sampled requests cost nothing; the ratio of
   means is reported too).
2. `--rounds` rounds, each going through every concurrency (1, 4, 16, 32) with a greedy and a
   sampled (`--temperature`) level, alternating: each level is `--num_requests` streaming
   completions with that many in flight, and every level sends the same prompts (random ids of
   `--prompt_len`). Rounds keep the levels that are compared close in time: a host whose speed
   drifts over minutes skews a ratio of levels run far apart.

Per level, as vLLM's benchmark_serving defines them: request throughput (completed / duration),
output tokens/s (sum of completion tokens / duration), TTFT (request sent -> first streamed token),
TPOT ((latency - TTFT) / (output tokens - 1), for requests with more than one token) and ITL (time
between consecutive streamed chunks; a chunk holds one token unless the server coalesced several:
a loop that falls behind, or a block of `--decode_steps`; `tokens_per_chunk` says how many), each
mean, p50 and p99 in milliseconds, and failures, over all rounds (tokens and durations summed, latencies pooled; tokens/s of each round kept beside).
Counts are cross-checked against the deltas of the server's /metrics. The 16-vs-1 speedup is the
median over rounds of that round's ratio. `ok`: no request failed, every cross-check holds, 16
clients reach at least 8x the output tokens/s of 1 client (greedy and sampled), and the
fresh-vs-after-burst TPOT ratio is within 20% of 1 (either way).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import httpx
import jax
import numpy as np
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from t5like.config import get_variant
from t5like.data import corpus
from t5like.data import tokenizer as tokenizer_lib
from t5like.infer import decode
from t5like.models.random_weights import random_params
from t5like.serve import bundle

LOOPBACK = ('127.0.0.1', 'localhost', '::1')


def scrape(url: str) -> dict:
  text = httpx.get(f'{url}/metrics', timeout=30).text
  return {(s.name, frozenset(s.labels.items())): s.value
          for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(m: dict, name: str, **labels) -> float:
  return sum(v for (n, lb), v in m.items() if n == name and set(labels.items()) <= lb)


def stats_ms(xs) -> dict:
  if not xs:
    return {'mean': None, 'p50': None, 'p99': None}
  a = np.asarray(xs) * 1e3
  return {'mean': float(a.mean()), 'p50': float(np.percentile(a, 50)),
          'p99': float(np.percentile(a, 99))}


class _ResponseReader(asyncio.Protocol):
  """Parses HTTP/1.1 responses (chunked or Content-Length) as bytes arrive, stamping each SSE
  event with the time its bytes came in; one response at a time."""

  def __init__(self):
    self.transport = None
    self.closed = False
    self._buf = bytearray()
    self._done: asyncio.Future | None = None

  def connection_made(self, transport):
    self.transport = transport

  def expect(self) -> asyncio.Future:
    """Resets for the next response; the future gets (status, headers, events, body)."""
    self._done = asyncio.get_running_loop().create_future()
    self._state, self._status, self._hdrs, self._need = 'head', 0, {}, 0
    self._events, self._sse, self._body = [], b'', bytearray()
    return self._done

  def connection_lost(self, exc):
    self.closed = True
    if self._done is not None and not self._done.done():
      self._done.set_exception(ConnectionError(f'connection closed mid-response ({exc})'))

  def data_received(self, data: bytes) -> None:
    now = time.perf_counter()
    self._buf += data
    try:
      while self._done is not None and not self._done.done() and self._step(now):
        pass
    except ValueError as e:   # a malformed response: fail this request, not the run
      self._done.set_exception(e)
      self.transport.close()

  def _step(self, now: float) -> bool:
    """Consumes one element of the response if it has fully arrived."""
    buf = self._buf
    if self._state in ('head', 'size', 'trailer'):
      end = buf.find(b'\r\n\r\n' if self._state == 'head' else b'\r\n')
      if end < 0:
        return False
      line = bytes(buf[:end])
      del buf[:end + (4 if self._state == 'head' else 2)]
      if self._state == 'head':
        lines = line.decode('latin-1').split('\r\n')
        self._status = int(lines[0].split()[1])
        self._hdrs = {k.strip().lower(): v.strip()
                      for k, _, v in (l.partition(':') for l in lines[1:] if l)}
        if self._hdrs.get('transfer-encoding', '').lower() == 'chunked':
          self._state = 'size'
        else:
          self._state, self._need = 'data', int(self._hdrs.get('content-length', 0))
      elif self._state == 'size':
        size = int(line.split(b';')[0], 16)
        self._state, self._need = ('trailer', 0) if size == 0 else ('chunk', size + 2)
      else:
        self._finish()
      return True
    if len(buf) < self._need:
      return False
    piece = bytes(buf[:self._need])
    del buf[:self._need]
    if self._state == 'data':
      self._body += piece
      self._finish()
      return True
    self._body += piece[:-2]
    self._sse += piece[:-2]
    *events, self._sse = self._sse.split(b'\n\n')
    self._events += [(now, e[6:].decode()) for e in events if e.startswith(b'data: ')]
    self._state = 'size'
    return True

  def _finish(self) -> None:
    self._done.set_result((self._status, self._hdrs, self._events, bytes(self._body)))


class StreamClient:
  """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the SSE answer.

  A protocol on the event loop rather than httpx or asyncio streams: on a 2-core host the client
  shares the CPU with the server, and httpx's per-line stream machinery cost about as much CPU per
  token as the server itself, which measured the client more than the server. Each event keeps the
  time its bytes arrived; they are parsed as JSON after the response, off the timed path."""

  def __init__(self, host: str, port: int, timeout: float):
    self.host, self.port, self.timeout = host, port, timeout
    self.transport = self._reader = None

  async def close(self) -> None:
    if self.transport is not None:
      self.transport.close()
      self.transport = self._reader = None

  async def post(self, path: str, body: dict) -> list[tuple[float, str]]:
    """(arrival time, SSE data string) of each event; ValueError on a non-200 answer."""
    if self._reader is None or self._reader.closed:
      self.transport, self._reader = await asyncio.get_running_loop().create_connection(
          _ResponseReader, self.host, self.port)
    payload = json.dumps(body).encode()
    done = self._reader.expect()
    self.transport.write(f'POST {path} HTTP/1.1\r\nHost: {self.host}\r\n'
                         f'Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n'
                         f'\r\n'.encode() + payload)
    status, hdrs, events, raw = await done
    if status != 200 or hdrs.get('connection', '').lower() == 'close':
      await self.close()
    if status != 200:
      raise ValueError(f'HTTP {status}: {raw[:200]!r}')
    return events


async def one_request(client: StreamClient, body: dict) -> dict:
  t0 = time.perf_counter()
  times, counts, usage, error = [], [], None, None
  try:
    async with asyncio.timeout(client.timeout):
      events = await client.post('/v1/completions', body)
      for now, data in events:
        if data == '[DONE]':
          continue
        chunk = json.loads(data)
        if 'error' in chunk:
          error = chunk['error']['message']
        elif chunk.get('usage'):
          usage = chunk['usage']
        elif chunk['choices'] and chunk['choices'][0].get('token_ids'):
          times.append(now)   # a chunk may carry several tokens (a block of decode steps)
          counts.append(len(chunk['choices'][0]['token_ids']))
  except (OSError, TimeoutError, ValueError) as e:
    await client.close()
    return {'ok': False, 'error': f'{type(e).__name__}: {e}'}
  end = events[-1][0] if events else time.perf_counter()   # the last bytes' arrival
  if error or usage is None:
    return {'ok': False, 'error': error or 'no usage'}
  n = usage['completion_tokens']
  if sum(counts) != n:
    return {'ok': False, 'error': f'chunks carried {sum(counts)} token ids, usage says {n}'}
  # A stop at the first token streams no token: its TTFT is the whole request.
  return {'ok': True, 'ttft': (times[0] if times else end) - t0, 'latency': end - t0,
          'itl': list(np.diff(times)),
          'output_tokens': n, 'chunks': len(times), 'prompt_tokens': usage['prompt_tokens']}


def make_bodies(model: str, num_requests: int, max_tokens: int, prompt_len: int,
                temperature: float) -> list[dict]:
  """The same prompts for every level (a fixed seed); sampled requests get one seed each."""
  rng = np.random.default_rng(0)
  return [{'model': model, 'prompt': [int(t) for t in rng.integers(3, 300, prompt_len)],
           'max_tokens': max_tokens, 'temperature': temperature, 'stream': True,
           **({'seed': i} if temperature > 0 else {}),
           # token ids in every chunk: a token whose text is still empty is streamed too, so
           # TTFT and ITL time tokens, not visible characters
           'return_token_ids': True,
           'stream_options': {'include_usage': True}} for i in range(num_requests)]


async def run_level(url: str, bodies: list[dict], concurrency: int, max_seconds: float) -> dict:
  """`concurrency` clients, each on its own connection, take the next body until none is left.
  The raw results; `summarize` turns runs of a level into its figures."""
  deadline = time.perf_counter() + max_seconds
  u = urlparse(url)
  todo = collections.deque(enumerate(bodies))
  results: list[dict | None] = [None] * len(bodies)

  async def worker():
    client = StreamClient(u.hostname, u.port or 80, max_seconds + 60)
    try:
      while todo and time.perf_counter() <= deadline:
        i, body = todo.popleft()
        results[i] = await one_request(client, body)
    finally:
      await client.close()

  t0, cpu0 = time.perf_counter(), time.process_time()
  await asyncio.gather(*(worker() for _ in range(concurrency)))
  return {'concurrency': concurrency, 'temperature': bodies[0]['temperature'],
          'duration_s': time.perf_counter() - t0,
          # the client shares the host's CPUs with the server
          'client_cpu_s': time.process_time() - cpu0,
          'results': [r for r in results if r is not None]}


def _tokens(results) -> int:
  return sum(r['output_tokens'] for r in results if r['ok'])


def summarize(runs: list[dict]) -> dict:
  """One level's figures over its runs (rounds): counts and durations summed, latencies pooled."""
  done = [r for run in runs for r in run['results']]
  ok = [r for r in done if r['ok']]
  duration = sum(run['duration_s'] for run in runs)
  out_tokens = _tokens(done)
  level = {
      'concurrency': runs[0]['concurrency'], 'temperature': runs[0]['temperature'],
      'rounds': len(runs), 'requests': len(done), 'completed': len(ok),
      'failed': len(done) - len(ok), 'errors': sorted({r['error'] for r in done if not r['ok']})[:5],
      'duration_s': duration, 'request_throughput': len(ok) / duration,
      'output_tokens': out_tokens, 'output_tokens_per_s': out_tokens / duration,
      'output_tokens_per_s_by_round': [_tokens(run['results']) / run['duration_s'] for run in runs],
      'prompt_tokens': sum(r['prompt_tokens'] for r in ok),
      'ttft_ms': stats_ms([r['ttft'] for r in ok]),
      'tpot_ms': stats_ms([(r['latency'] - r['ttft']) / (r['output_tokens'] - 1) for r in ok
                           if r['output_tokens'] > 1]),
      'itl_ms': stats_ms([x for r in ok for x in r['itl']]),
      'tokens_per_chunk': sum(r['output_tokens'] for r in ok) / max(1, sum(r['chunks'] for r in ok)),
      'e2e_latency_ms': stats_ms([r['latency'] for r in ok]),
      'client_cpu_s': sum(run['client_cpu_s'] for run in runs),
  }
  checks = [run['metrics_check'] for run in runs if 'metrics_check' in run]
  if checks:
    level['metrics_check'] = {'match': all(c['match'] for c in checks), 'by_round': checks}
  return level


def check_metrics(before: dict, after: dict, level: dict, model: str) -> dict:
  """The server's counters moved by what the client counted (`level`: `summarize`'s)."""
  d = lambda name, **lb: total(after, name, **lb) - total(before, name, **lb)
  got = {'requests_200': d('t5like_requests_total', model=model, endpoint='/v1/completions',
                           status='200'),
         'generation_tokens': d('t5like_generation_tokens_total', model=model),
         'prompt_tokens': d('t5like_prompt_tokens_total', model=model),
         'ttft_count': d('t5like_time_to_first_token_seconds_count', model=model)}
  want = {'requests_200': level['completed'], 'generation_tokens': level['output_tokens'],
          'prompt_tokens': level['prompt_tokens'], 'ttft_count': level['completed']}
  return {'server': got, 'client': want, 'match': all(got[k] == want[k] for k in want)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def export_variant(variant: str, base_path: str) -> None:
  """A bundle of `variant` under `<base_path>/<variant>/1`. Its weights are random with a spread
  under which greedy outputs differ between prompts (checked here): the initial weights of a
  fresh model greedy-decode the pad token for every prompt, and would stream no text at all."""
  cfg = get_variant(variant)
  tok = tokenizer_lib.train_tokenizer(corpus.shakespeare_documents()[:2],
                                      min(400, cfg.vocab_size - 112), max_sentences=2000)
  params = jax.device_get(random_params(cfg, seed=0, embed_std=0.3, std=0.2))
  prompts = np.random.default_rng(0).integers(3, 300, (4, 16)).astype(np.int32)
  outputs = np.asarray(decode.greedy(params, cfg, prompts, 8, stop_at_eos=False).tokens)
  if len({tuple(o) for o in outputs}) < len(prompts) or len(np.unique(outputs)) < 8:
    raise SystemExit(f'{variant}: greedy outputs of the random weights do not vary: {outputs}')
  bundle.export_bundle(params, cfg, tok, os.path.join(base_path, variant, '1'))


def start_server(args) -> tuple[subprocess.Popen, str]:
  port = free_port()
  cmd = [sys.executable, '-m', 't5like.serve', f'--model_base_path={args.model_base_path}',
         f'--port={port}', f'--num_slots={args.num_slots}', f'--max_queue={args.num_requests}',
         f'--prompt_buckets={args.prompt_buckets}', f'--max_new_tokens={args.max_tokens}',
         f'--prefill_batch_sizes={args.prefill_batch_sizes}',
         f'--decode_steps={args.decode_steps}', '--log_level=warning']
  proc = subprocess.Popen(cmd, env=dict(os.environ))
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + args.startup_timeout_s
  while time.time() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f'server exited with {proc.returncode}')
    try:
      if httpx.get(f'{url}/health/ready', timeout=2).status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise SystemExit(f'server not ready within {args.startup_timeout_s}s')


def measure(url: str, model: str, bodies: list[dict], concurrency: int,
            max_seconds: float) -> dict:
  """One run of a level, its counts cross-checked against the server's metrics."""
  before = scrape(url)
  # uvloop: the client's own loop costs less of the CPU it shares with the server
  with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    run = runner.run(run_level(url, bodies, concurrency, max_seconds))
  time.sleep(0.2)   # the server records a request just after its last byte
  level = summarize([run])
  run['metrics_check'] = check_metrics(before, scrape(url), level, model)
  print(f'concurrency {concurrency} T={bodies[0]["temperature"]}: '
        f'{level["output_tokens_per_s"]:.0f} output tok/s, TPOT p50 '
        f'{level["tpot_ms"]["p50"]:.2f} ms, {level["failed"]} failed, metrics match: '
        f'{run["metrics_check"]["match"]}', file=sys.stderr)
  return run


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--url', default='', help='a running server (loopback only)')
  p.add_argument('--model_base_path', default='', help='start a server over this base path')
  p.add_argument('--variant', default='', help='start a server over a fresh bundle of this variant')
  p.add_argument('--model', default='', help='model name (default: the variant)')
  p.add_argument('--concurrency', default='1,4,16,32')
  p.add_argument('--rounds', type=int, default=3, help='passes over every level, alternating')
  p.add_argument('--num_requests', type=int, default=1024,
                 help='per level: a level of 16 clients then lasts seconds, and its tail (the last '
                      'requests, run by fewer clients) weighs little')
  p.add_argument('--probe_requests', type=int, default=32, help='greedy 1-client TPOT probes')
  p.add_argument('--temperature', type=float, default=0.8, help='of the sampled levels')
  p.add_argument('--max_tokens', type=int, default=64)
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--max_seconds', type=float, default=180, help='per level; later requests skip')
  p.add_argument('--num_slots', type=int, default=32)
  p.add_argument('--prompt_buckets', default='32')
  p.add_argument('--decode_steps', type=int, default=1, help="the server's flag")
  # Every power of two: a steady stream of arrivals (2 or 3 a block at 16 clients) is prefilled
  # in one or two calls, not one call each.
  p.add_argument('--prefill_batch_sizes', default='1,2,4,8,16', help="the server's flag")
  p.add_argument('--startup_timeout_s', type=float, default=600)
  p.add_argument('--out', default='', help='also write the JSON here')
  args = p.parse_args(argv)
  if sum(map(bool, (args.url, args.model_base_path, args.variant))) != 1:
    p.error('pass exactly one of --url, --model_base_path and --variant')
  model = args.model or args.variant
  if not model:
    p.error('--model is required with --url or --model_base_path')
  proc, tmp = None, None
  load_before = os.getloadavg()[0]
  if args.url:
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
      p.error(f'--url host {host!r} is not loopback; this load test only targets this machine')
    url = args.url.rstrip('/')
  else:
    if args.variant:
      tmp = tempfile.TemporaryDirectory(prefix='load_test_')
      args.model_base_path = tmp.name
      export_variant(args.variant, tmp.name)
    proc, url = start_server(args)
  concurrency = [int(x) for x in args.concurrency.split(',')]
  greedy = make_bodies(model, args.num_requests, args.max_tokens, args.prompt_len, 0.0)
  sampled = make_bodies(model, args.num_requests, args.max_tokens, args.prompt_len,
                        args.temperature)
  probe = greedy[:args.probe_requests]
  try:
    # 1. Greedy TPOT on the fresh server, then after bursts of sampled traffic.
    measure(url, model, probe, 1, args.max_seconds)
    fresh = summarize([measure(url, model, probe, 1, args.max_seconds)])
    after = []
    for _ in range(2):
      measure(url, model, sampled[:32], 16, args.max_seconds)
      after.append(summarize([measure(url, model, probe, 1, args.max_seconds)]))
    # p50s: robust to the stalls of a shared machine; the means are kept beside them.
    ratio = (float(np.mean([a['tpot_ms']['p50'] for a in after])) / fresh['tpot_ms']['p50']
             if fresh['tpot_ms']['p50'] else None)
    ratio_mean = (float(np.mean([a['tpot_ms']['mean'] for a in after])) / fresh['tpot_ms']['mean']
                  if fresh['tpot_ms']['mean'] else None)
    # 2. Rounds over every level, greedy and sampled alternating.
    runs = {(m, c): [] for m in ('greedy', 'sampled') for c in concurrency}
    for _ in range(args.rounds):
      for c in concurrency:
        runs['greedy', c].append(measure(url, model, greedy, c, args.max_seconds))
        runs['sampled', c].append(measure(url, model, sampled, c, args.max_seconds))
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=120)
    if tmp is not None:
      tmp.cleanup()

  levels = {m: [summarize(runs[m, c]) for c in concurrency] for m in ('greedy', 'sampled')}

  def speedups(mode):
    """16-vs-1 output tokens/s of each round."""
    if (mode, 16) not in runs or (mode, 1) not in runs:
      return []
    return [_tokens(a['results']) / a['duration_s'] / (_tokens(b['results']) / b['duration_s'])
            for a, b in zip(runs[mode, 16], runs[mode, 1]) if _tokens(b['results'])]
  by_round = {m: speedups(m) for m in levels}
  speedup = {m: (float(np.median(v)) if v else None) for m, v in by_round.items()}
  tps = lambda m, c: next(l['output_tokens_per_s'] for l in levels[m] if l['concurrency'] == c)
  sampled_vs_greedy = {c: tps('sampled', c) / tps('greedy', c) for c in concurrency
                       if tps('greedy', c)}
  all_levels = [fresh, *after] + levels['greedy'] + levels['sampled']
  report = {
      'model': model, 'variant': args.variant or None, 'num_slots': args.num_slots,
      'prefill_batch_sizes': args.prefill_batch_sizes if not args.url else None,
      'decode_steps': args.decode_steps if not args.url else None,
      'max_tokens': args.max_tokens, 'prompt_len': args.prompt_len,
      'num_requests': args.num_requests, 'rounds': args.rounds,
      'temperature_sampled': args.temperature,
      # The 1-minute load average before the server started and at the end: other work on the
      # host shows there (the server and the clients load it too).
      'machine': {'cpus': os.cpu_count(), 'load_avg_1min': [load_before, os.getloadavg()[0]]},
      'fresh_vs_after_burst': {'fresh': fresh, 'after_burst': after, 'tpot_p50_ratio': ratio,
                               'tpot_mean_ratio': ratio_mean},
      'levels': levels, 'speedup_16_vs_1': speedup, 'speedup_16_vs_1_by_round': by_round,
      'sampled_vs_greedy_tokens_per_s': sampled_vs_greedy,
      'ok': bool(all(l['failed'] == 0 and l['metrics_check']['match'] for l in all_levels)
             and all(v is None or v >= 8.0 for v in speedup.values())
             and ratio is not None and 1 / 1.2 <= ratio <= 1.2)}
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  return report


if __name__ == '__main__':
  main()
