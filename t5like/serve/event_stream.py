"""The server-sent-events response of OpenAI-style streams, with fewer writes a stream.

Starlette's StreamingResponse runs a second task a response to notice a client going away and
ends every body with an empty write of its own. A `Generation` watches its client itself, so this
response only sends: each string the stream yields goes out as one body message, and the one
ending with `data: [DONE]` also ends the body. On loopback every write runs the receiver's TCP
path inside the sender's system call, so writes a stream bound how many clients one server loop
streams to.
"""
from __future__ import annotations

from starlette.responses import StreamingResponse

DONE = 'data: [DONE]\n\n'


class EventStream(StreamingResponse):
  """`events` (async, str) as text/event-stream; DONE must end the last of them."""

  def __init__(self, events, headers: dict | None = None):
    super().__init__(events, media_type='text/event-stream', headers=headers)

  async def __call__(self, scope, receive, send) -> None:
    await send({'type': 'http.response.start', 'status': self.status_code,
                'headers': self.raw_headers})
    ended = False
    try:
      async for text in self.body_iterator:
        ended = text.endswith(DONE)
        await send({'type': 'http.response.body', 'body': text.encode(), 'more_body': not ended})
        if ended:
          break
    finally:   # the stream's own cleanup (cancel, record) runs now, also on an error
      await self.body_iterator.aclose()
    if not ended:   # a stream that stopped early still ends its body
      await send({'type': 'http.response.body', 'body': b'', 'more_body': False})
