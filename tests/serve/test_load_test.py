"""scripts/load_test.py's client against a live server: every streamed token is timed once, the
counts agree with the server's own metrics, connections are kept alive, and an error answer is a
failure with its status, not a crash."""
import asyncio
import importlib.util
import os

from tests.serve.conftest import ENGINE_KW

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location('load_test',
                                               os.path.join(ROOT, 'scripts', 'load_test.py'))
load_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_test)

MAX_TOKENS = min(12, ENGINE_KW['max_new_tokens'])


def test_levels_time_every_token_and_match_the_server_metrics(live):
  for temperature in (0.0, 0.8):
    bodies = load_test.make_bodies('tiny', 10, MAX_TOKENS, 8, temperature)
    runs = [load_test.measure(live.url, 'tiny', bodies, 3, 60) for _ in range(2)]
    level = load_test.summarize(runs)
    assert level['completed'] == 20 and level['failed'] == 0, level['errors']
    assert level['metrics_check']['match'], level['metrics_check']
    assert len(level['output_tokens_per_s_by_round']) == 2
    assert 20 <= level['output_tokens'] <= 20 * MAX_TOKENS
    assert level['client_cpu_s'] > 0
    # one inter-token gap per streamed token after the first: nothing dropped or counted twice
    ttft, tpot, e2e = level['ttft_ms'], level['tpot_ms'], level['e2e_latency_ms']
    assert 0 < ttft['mean'] <= e2e['mean'] and tpot['mean'] > 0


def test_each_client_keeps_its_connection(live):
  bodies = load_test.make_bodies('tiny', 6, 4, 8, 0.0)
  u = load_test.urlparse(live.url)

  async def run():
    client = load_test.StreamClient(u.hostname, u.port, 60)
    results, writers = [], set()
    for body in bodies:
      results.append(await load_test.one_request(client, body))
      writers.add(id(client.transport))
    await client.close()
    return results, writers
  results, writers = asyncio.run(run())
  assert all(r['ok'] for r in results), results
  assert len(writers) == 1
  # a chunk per token (a loop that falls behind may join a few into one chunk)
  assert all(len(r['itl']) + 1 <= r['output_tokens'] for r in results)
  assert any(len(r['itl']) + 1 == r['output_tokens'] > 1 for r in results)


def test_error_answers_are_failures_with_their_status(live):
  bad = [{**b, 'model': 'no-such-model'} for b in load_test.make_bodies('tiny', 3, 4, 8, 0.0)]
  level = load_test.summarize([asyncio.run(load_test.run_level(live.url, bad, 2, 30))])
  assert level['completed'] == 0 and level['failed'] == 3
  assert any(e.startswith('ValueError: HTTP 404') for e in level['errors']), level['errors']


def test_events_split_or_joined_across_chunks_are_each_read_once():
  """A server may put two events in one chunk or cut one across chunks."""
  events = [b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [{"text": "b"}]}\n\n',
            b'data: {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 2}}\n\n',
            b'data: [DONE]\n\n']
  # chunks: events 0 and 1 together, event 2 cut in two, the end marker alone
  body = events[0] + events[1] + events[2] + events[3]
  cut = len(events[0]) + len(events[1]) + 10
  chunks = [body[:cut], body[cut:len(body) - len(events[3])], events[3]]

  async def handle(reader, writer):
    await reader.readuntil(b'\r\n\r\n')
    await reader.readexactly(2)   # the body: {}
    writer.write(b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n')
    for c in chunks:
      writer.write(b'%x\r\n%s\r\n' % (len(c), c))
      await writer.drain()
    writer.write(b'0\r\n\r\n')
    await writer.drain()
    writer.close()

  async def run():
    server = await asyncio.start_server(handle, '127.0.0.1', 0)
    port = server.sockets[0].getsockname()[1]
    client = load_test.StreamClient('127.0.0.1', port, 10)
    got = [data for _, data in await client.post('/v1/completions', {})]
    await client.close()
    server.close()
    return got
  got = asyncio.run(run())
  assert got == [e[6:-2].decode() for e in events]
