"""EventStream: one body message per yielded string, the body ending with the DONE event."""
import asyncio

from t5like.serve.event_stream import DONE, EventStream


def messages_of(events: list[str]):
  sent, closed = [], []

  async def stream():
    try:
      for e in events:
        yield e
    finally:
      closed.append(True)

  async def send(message):
    sent.append(message)

  async def receive():
    raise AssertionError('the response must not read from the client')

  asyncio.run(EventStream(stream(), {'Cache-Control': 'no-cache'})(
      {'type': 'http'}, receive, send))
  return sent, closed


def test_done_ends_the_body_in_the_same_write():
  sent, closed = messages_of(['data: {"a": 1}\n\n', 'data: {"b": 2}\n\n' + DONE])
  assert sent[0]['type'] == 'http.response.start' and sent[0]['status'] == 200
  headers = dict(sent[0]['headers'])
  assert headers[b'content-type'].startswith(b'text/event-stream')
  assert headers[b'cache-control'] == b'no-cache'
  bodies = [(m['body'], m['more_body']) for m in sent[1:]]
  assert bodies == [(b'data: {"a": 1}\n\n', True), (b'data: {"b": 2}\n\n' + DONE.encode(), False)]
  assert closed == [True]


def test_a_stream_without_done_still_ends_its_body():
  sent, closed = messages_of(['data: {"a": 1}\n\n'])
  assert [(m['body'], m['more_body']) for m in sent[1:]] == [(b'data: {"a": 1}\n\n', True),
                                                            (b'', False)]
  assert closed == [True]
