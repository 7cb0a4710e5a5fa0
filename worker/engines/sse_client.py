"""One streamed HTTP POST whose answer is server-sent events, read with
callbacks (the llama.cpp engine's token streams).

httptools (uvicorn's C HTTP parser) parses the answer as it arrives, and
each ``data:`` line goes to ``on_event`` from the protocol's
``data_received``: no task wakes per line and no stream buffer sits between
the socket and the handler. This runs once per token, on the CPU that the
engine's own threads need on a small machine; aiohttp's line reader took
about a third of this worker's CPU per token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

CONNECT_TIMEOUT_S = 10.0

# The data of one event; True when it is the stream's last.
OnEvent = Callable[[bytes], bool]


class StreamError(Exception):
    """The server refused the request or broke off the stream."""


class _EventStream(asyncio.Protocol):
    def __init__(self, on_event: OnEvent, done: asyncio.Future[None]) -> None:
        self._on_event = on_event
        self._done = done
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        self._partial = b""  # the start of a line whose end has not come yet
        self._refusal = b""  # the body of an answer that is not 200
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # on_event raised: that is the error
            self._finish(exc.__context__ if isinstance(exc.__context__, Exception) else exc)
        except httptools.HttpParserError as exc:
            self._finish(StreamError(f"malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or StreamError("the server closed the stream before its last event"))

    # httptools' callbacks

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._done.done():
            return
        if self._status != 200:
            self._refusal += body
            return
        lines = (self._partial + body).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"data: ") and self._on_event(line[6:]):
                self._finish(None)
                return

    def on_message_complete(self) -> None:
        if self._status != 200:
            self._finish(StreamError(f"answered {self._status}: {self._refusal[:300].decode(errors='replace')}"))
        else:
            self._finish(StreamError("the stream ended before its last event"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self._done.done():
            if exc is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(exc)
        if self._transport is not None:
            self._transport.close()


async def post_events(socket_path: str, path: str, body: bytes, on_event: OnEvent) -> None:
    """POST ``body`` (JSON) to ``path`` of the server listening on the UNIX
    socket ``socket_path``, and hand each event's data to
    ``on_event`` until it returns True. Raises ``StreamError`` (or
    ``OSError``) if the request fails or the stream breaks off, or what
    ``on_event`` raised. Cancelling it closes the connection, which is how
    the server learns to stop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        transport, _ = await loop.create_unix_connection(lambda: _EventStream(on_event, done), socket_path)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n")
        transport.write(head.encode() + body)
        await done
    finally:
        transport.close()
