"""The response every streamed answer goes out in (chat and text
completions, ``/v1/responses``): sse-starlette's ``EventSourceResponse``,
less the anyio cancel scope it opens around every send to apply
``send_timeout``. With no timeout set (as here) that scope can never fire,
and at one event per token it was the largest cost of a streamed token in
the API process.

This is the one place llmq reaches into sse-starlette's internals: it
overrides the private ``_send_with_timeout`` and keeps its contract (a send
that raises marks ``_send_interrupted``, so no closing body is attempted on
a broken transport). sse-starlette has no public hook for it. Tested with
sse-starlette 3.7 and pinned below 3.8 in ``pyproject.toml``;
``tests/test_third_party.py`` fails loudly if the method or the flag it
keeps is gone, or if a stream no longer goes through it.
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send


class TokenStream(EventSourceResponse):
    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True
            raise


def sse_event(data: str) -> bytes:
    """One SSE event, framed here: sse-starlette passes bytes through as they are."""
    return b"data: " + data.encode() + b"\n\n"
