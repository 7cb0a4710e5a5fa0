"""A client that hangs up while its request waits, noticed as it happens.

Starlette's ``Request.is_disconnected`` only peeks at the ASGI receive
channel, so code that waits on something else (a job's first event, a
collected answer) had to poll it and learned of a hang-up up to one poll
late: late enough for a queued job to reach the engine after all.
``CancelOnHangUp`` awaits ``http.disconnect`` in a task beside the waiting
one and cancels the waiting task the moment it comes, as ``asyncio.timeout``
does at its deadline; the block is left with a 499. What the block does on
cancellation (cancel the job) runs as for any cancellation.

Streamed answers need none of this: sse-starlette listens for the
disconnect itself and cancels the stream.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive

from api.errors import APIError


class CancelOnHangUp:
    """``async with CancelOnHangUp(request.receive): ...`` raises a 499
    ``APIError`` as soon as the client hangs up inside the block."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.hung_up = False

    async def __aenter__(self) -> CancelOnHangUp:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch(), name="llmq-hangup-watch")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._task is not None and self._watcher is not None
        # Before any await: once the block is left, the watcher can no
        # longer cancel this task.
        self._watcher.cancel()
        if not self.hung_up:
            return
        # Only our own cancellation becomes a 499; one from elsewhere
        # (the server stopping) goes on as it came.
        if self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            raise APIError(499, "Client closed the request before its answer.", code="client_closed") from exc

    async def _watch(self) -> None:
        # FastAPI has read the body before the route runs, so the next
        # message is the disconnect (uvicorn sends nothing else).
        while (await self._receive())["type"] != "http.disconnect":
            continue
        self.hung_up = True
        assert self._task is not None
        self._task.cancel()
