"""The one private part of sse-starlette llmq relies on (``api/sse.py``):
these fail loudly when a new sse-starlette changes it, rather than letting
every streamed token pay an anyio cancel scope again, or a broken transport
get a closing body written to it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sse_starlette.sse
from sse_starlette import EventSourceResponse

from api.sse import TokenStream, sse_event

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "GET",
         "path": "/", "headers": []}


def test_the_overridden_method_and_the_flag_it_keeps_are_still_there() -> None:
    method = EventSourceResponse._send_with_timeout
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters) == ["self", "send", "message"]
    assert EventSourceResponse(iter(())).__dict__.get("_send_interrupted") is False
    # sse-starlette sends every event and the closing body through it.
    assert "self._send_with_timeout(" in inspect.getsource(EventSourceResponse._stream_response)


async def _events() -> AsyncIterator[bytes]:
    for i in range(3):
        yield sse_event(f'{{"i":{i}}}')
    yield sse_event("[DONE]")


async def _run(response: EventSourceResponse, send: Any) -> None:
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()  # the client never hangs up
        return {"type": "http.disconnect"}

    try:
        await asyncio.wait_for(response(SCOPE, receive, send), timeout=10)
    finally:
        gone.set()


def test_a_stream_goes_out_whole_without_a_cancel_scope_per_send(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scope(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a send opened anyio's cancel scope: TokenStream's override no longer applies")

    monkeypatch.setattr(sse_starlette.sse.anyio, "move_on_after", no_scope)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(_run(TokenStream(_events(), sep="\n"), send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body == b'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\ndata: [DONE]\n\n'
    assert sent[0]["type"] == "http.response.start" and sent[-1] == {"type": "http.response.body", "body": b"",
                                                                      "more_body": False}


def test_a_send_that_fails_marks_the_stream_interrupted() -> None:
    response = TokenStream(_events(), sep="\n")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise OSError("the client's socket is gone")

    with pytest.raises(BaseException):
        asyncio.run(_run(response, send))
    assert response._send_interrupted is True
