"""Load test of the model server (loopback only, bounded request count and time), JSON output.

  python scripts/load_test.py --model_base_path=models/ --model=tiny          # starts a server
  python scripts/load_test.py --url=http://127.0.0.1:8000 --model=tiny        # uses a running one

For each concurrency (1, 4, 16 by default) `--num_requests` streaming completions run through an
asyncio client with that many in flight, and it reports, as vLLM's benchmark_serving defines them:
request throughput (completed / duration), output tokens/s (sum of completion tokens / duration),
TTFT (request sent -> first streamed token), TPOT ((latency - TTFT) / (output tokens - 1), for
requests with more than one token) and ITL (time between consecutive streamed tokens), each mean,
p50 and p99 in milliseconds. Its counts are cross-checked against the deltas of the server's
/metrics (requests by status, generation tokens, TTFT histogram count). `ok` is true when no request
failed, every cross-check holds and 16-client output tokens/s is at least 4x the 1-client figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

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


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
  t0 = time.perf_counter()
  times, usage, error = [], None, None
  try:
    async with client.stream('POST', '/v1/completions', json=body) as r:
      if r.status_code != 200:
        return {'ok': False, 'error': f'HTTP {r.status_code}: {(await r.aread())[:200]!r}'}
      async for line in r.aiter_lines():
        if not line.startswith('data: ') or line == 'data: [DONE]':
          continue
        chunk = json.loads(line[6:])
        if 'error' in chunk:
          error = chunk['error']['message']
        elif chunk.get('usage'):
          usage = chunk['usage']
        elif chunk['choices']:
          times.append(time.perf_counter())
  except httpx.HTTPError as e:
    return {'ok': False, 'error': f'{type(e).__name__}: {e}'}
  end = time.perf_counter()
  if error or usage is None or not times:
    return {'ok': False, 'error': error or 'no usage / no tokens'}
  # The last chunk carries the finish reason; a stop at EOS adds no token of its own.
  n = usage['completion_tokens']
  token_times = times[:n]
  return {'ok': True, 'ttft': token_times[0] - t0 if token_times else end - t0, 'latency': end - t0,
          'itl': list(np.diff(token_times)), 'output_tokens': n,
          'prompt_tokens': usage['prompt_tokens']}


async def run_level(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int,
                    max_seconds: float, prompt_len: int) -> dict:
  rng = np.random.default_rng(concurrency)
  bodies = [{'model': model, 'prompt': [int(t) for t in rng.integers(3, 300, prompt_len)],
             'max_tokens': max_tokens, 'temperature': 0, 'stream': True,
             'stream_options': {'include_usage': True}} for _ in range(num_requests)]
  sem = asyncio.Semaphore(concurrency)
  deadline = time.perf_counter() + max_seconds
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 60, limits=limits) as client:
    async def guarded(body):
      async with sem:
        if time.perf_counter() > deadline:
          return None
        return await one_request(client, body)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(b) for b in bodies))
    duration = time.perf_counter() - t0
  done = [r for r in results if r is not None]
  ok = [r for r in done if r['ok']]
  out_tokens = sum(r['output_tokens'] for r in ok)
  return {
      'concurrency': concurrency, 'requests': len(done), 'completed': len(ok),
      'failed': len(done) - len(ok), 'errors': sorted({r['error'] for r in done if not r['ok']})[:5],
      'duration_s': duration, 'request_throughput': len(ok) / duration,
      'output_tokens': out_tokens, 'output_tokens_per_s': out_tokens / duration,
      'prompt_tokens': sum(r['prompt_tokens'] for r in ok),
      'ttft_ms': stats_ms([r['ttft'] for r in ok]),
      'tpot_ms': stats_ms([(r['latency'] - r['ttft']) / (r['output_tokens'] - 1) for r in ok
                           if r['output_tokens'] > 1]),
      'itl_ms': stats_ms([x for r in ok for x in r['itl']]),
      'e2e_latency_ms': stats_ms([r['latency'] for r in ok]),
  }


def check_metrics(before: dict, after: dict, level: dict, model: str) -> dict:
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


def start_server(args) -> tuple[subprocess.Popen, str]:
  port = free_port()
  cmd = [sys.executable, '-m', 't5like.serve', f'--model_base_path={args.model_base_path}',
         f'--port={port}', f'--num_slots={args.num_slots}', f'--max_queue={args.num_requests}',
         f'--prompt_buckets={args.prompt_buckets}', f'--max_new_tokens={args.max_tokens}',
         '--log_level=warning']
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


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--url', default='', help='a running server (loopback only)')
  p.add_argument('--model_base_path', default='', help='start a server over this base path')
  p.add_argument('--model', required=True)
  p.add_argument('--concurrency', default='1,4,16')
  p.add_argument('--num_requests', type=int, default=32, help='per concurrency level')
  p.add_argument('--max_tokens', type=int, default=64)
  p.add_argument('--prompt_len', type=int, default=16)
  p.add_argument('--max_seconds', type=float, default=120, help='per level; later requests skip')
  p.add_argument('--num_slots', type=int, default=16)
  p.add_argument('--prompt_buckets', default='32')
  p.add_argument('--startup_timeout_s', type=float, default=600)
  p.add_argument('--out', default='', help='also write the JSON here')
  args = p.parse_args(argv)
  if bool(args.url) == bool(args.model_base_path):
    p.error('pass exactly one of --url and --model_base_path')
  proc = None
  if args.url:
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
      p.error(f'--url host {host!r} is not loopback; this load test only targets this machine')
    url = args.url.rstrip('/')
  else:
    proc, url = start_server(args)
  try:
    levels = []
    for c in (int(x) for x in args.concurrency.split(',')):
      before = scrape(url)
      level = asyncio.run(run_level(url, args.model, c, args.num_requests, args.max_tokens,
                                    args.max_seconds, args.prompt_len))
      time.sleep(0.2)   # the server records a request just after its last byte
      level['metrics_check'] = check_metrics(before, scrape(url), level, args.model)
      levels.append(level)
      print(f'concurrency {c}: {level["output_tokens_per_s"]:.0f} output tok/s, '
            f'{level["failed"]} failed, metrics match: {level["metrics_check"]["match"]}',
            file=sys.stderr)
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=120)
  by_c = {l['concurrency']: l for l in levels}
  speedup = (by_c[16]['output_tokens_per_s'] / by_c[1]['output_tokens_per_s']
             if 1 in by_c and 16 in by_c and by_c[1]['output_tokens_per_s'] else None)
  report = {'model': args.model, 'max_tokens': args.max_tokens, 'prompt_len': args.prompt_len,
            'num_requests': args.num_requests, 'levels': levels,
            'speedup_16_vs_1': speedup,
            'ok': (all(l['failed'] == 0 and l['metrics_check']['match'] for l in levels)
                   and (speedup is None or speedup >= 4.0))}
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  return report


if __name__ == '__main__':
  main()
