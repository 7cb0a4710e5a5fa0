"""Turning a running job into OpenAI responses: one JSON body, or SSE chunks
(``data: {json}``, the role first, usage last when asked, then ``[DONE]``).

Chat and text completions differ only in the shape of a chunk, so each has a
small ``Shape`` and the stream and collect loops are shared.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.requests import Request

from api.errors import APIError
from api.jobs import RunningJob, error_from_event
from api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    UsageInfo,
)
from broker.schemas import Delta, Done, Error

DISCONNECT_POLL_S = 1.0


def usage_of(done: Done) -> UsageInfo:
    u = done.usage
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


class Shape(Protocol):
    def first(self, run: RunningJob) -> dict[str, Any] | None: ...
    def delta(self, run: RunningJob, text: str) -> dict[str, Any]: ...
    def final(self, run: RunningJob, finish_reason: str) -> dict[str, Any]: ...
    def usage(self, run: RunningJob, usage: UsageInfo) -> dict[str, Any]: ...
    def body(self, run: RunningJob, text: str, done: Done) -> dict[str, Any]: ...


class ChatShape:
    def _chunk(self, run: RunningJob, delta: ChatDelta, finish: str | None = None) -> dict[str, Any]:
        # OpenAI omits unset delta fields: the role only in the first chunk.
        choice = ChatChunkChoice(delta=delta.model_dump(exclude_none=True), finish_reason=finish)
        return ChatCompletionChunk(id=run.job_id, created=run.created, model=run.job.model, choices=[choice]).model_dump()

    def first(self, run: RunningJob) -> dict[str, Any]:
        return self._chunk(run, ChatDelta(role="assistant", content=""))

    def delta(self, run: RunningJob, text: str) -> dict[str, Any]:
        return self._chunk(run, ChatDelta(content=text))

    def final(self, run: RunningJob, finish_reason: str) -> dict[str, Any]:
        return self._chunk(run, ChatDelta(), finish_reason)

    def usage(self, run: RunningJob, usage: UsageInfo) -> dict[str, Any]:
        return ChatCompletionChunk(
            id=run.job_id, created=run.created, model=run.job.model, choices=[], usage=usage
        ).model_dump()

    def body(self, run: RunningJob, text: str, done: Done) -> dict[str, Any]:
        choice = ChatChoice(message=ChatMessageOut(content=text), finish_reason=done.finish_reason)
        return ChatCompletion(
            id=run.job_id, created=run.created, model=run.job.model, choices=[choice], usage=usage_of(done)
        ).model_dump()


class CompletionShape:
    def _chunk(self, run: RunningJob, text: str, finish: str | None = None) -> dict[str, Any]:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return Completion(id=run.job_id, created=run.created, model=run.job.model, choices=[choice]).model_dump(
            exclude={"usage"}
        )

    def first(self, run: RunningJob) -> None:
        return None

    def delta(self, run: RunningJob, text: str) -> dict[str, Any]:
        return self._chunk(run, text)

    def final(self, run: RunningJob, finish_reason: str) -> dict[str, Any]:
        return self._chunk(run, "", finish_reason)

    def usage(self, run: RunningJob, usage: UsageInfo) -> dict[str, Any]:
        return Completion(id=run.job_id, created=run.created, model=run.job.model, choices=[], usage=usage).model_dump()

    def body(self, run: RunningJob, text: str, done: Done) -> dict[str, Any]:
        return Completion(
            id=run.job_id, created=run.created, model=run.job.model,
            choices=[CompletionChoice(text=text, finish_reason=done.finish_reason)], usage=usage_of(done),
        ).model_dump()


def _sse(payload: dict[str, Any] | str) -> dict[str, str]:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))}


async def stream(run: RunningJob, shape: Shape, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """SSE events for one job. The ``finally`` cancels the job when the
    client leaves (Starlette cancels this generator then)."""
    try:
        first = shape.first(run)
        if first is not None:
            yield _sse(first)
        async for ev in run.events():
            if ev is None:
                continue
            if isinstance(ev, Delta):
                if ev.text:
                    yield _sse(shape.delta(run, ev.text))
            elif isinstance(ev, Done):
                yield _sse(shape.final(run, ev.finish_reason))
                if include_usage:
                    yield _sse(shape.usage(run, usage_of(ev)))
            elif isinstance(ev, Error):
                # Mid-stream errors keep OpenAI's error shape; the SDK raises on them.
                yield _sse(error_from_event(ev).body())
        yield _sse("[DONE]")
    finally:
        await asyncio.shield(run.close())


async def collect(run: RunningJob, shape: Shape, request: Request) -> dict[str, Any]:
    """The whole answer as one body. Looks for a client that hung up between
    events, since a non-streaming route is not cancelled when its client leaves."""
    parts: list[str] = []
    try:
        async for ev in run.events(tick_s=DISCONNECT_POLL_S):
            if ev is None:
                if await request.is_disconnected():
                    raise APIError(499, "Client closed the request.", code="client_closed")
            elif isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Done):
                return shape.body(run, "".join(parts), ev)
            elif isinstance(ev, Error):
                raise error_from_event(ev)
        raise APIError(500, "The job ended without a final event.", type="server_error")
    finally:
        await asyncio.shield(run.close())
