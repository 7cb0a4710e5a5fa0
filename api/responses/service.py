"""Responses: creating one (its job goes to the model's queue with the
response's events stream), following its stream, cancelling and deleting.

Every response goes through its stream, stored or not, streamed or not,
background or not: the worker appends the job's events to it, and every
answer (the SSE events, the final object, ``GET``) is folded from it
(``api/responses/events.py``). A request that waits (not background) follows
the stream from the API process that took it; nobody needs to, since each
process's keeper (``api/responses/keeper.py``) acts for responses whose
worker is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from api.errors import APIError, invalid
from api.jobs.lifecycle import Jobs, attempt_ids
from api.keys import NamedKey
from api.responses.events import Mark, ResponseFold
from api.responses.items import to_messages
from api.responses.protocol import ResponseCreateRequest, StoredResponse
from api.responses.store import ResponseStore, response_not_found
from api.responses.tail import StreamTail
from broker.schemas import Message
from broker.settings import Settings

log = logging.getLogger("llmq.api.responses.routes")

# How long a follower with nothing new waits before it looks whether its
# response still exists (deleted meanwhile).
EXISTS_CHECK_S = 5.0


# A follow of a response: (its state, the events just added), until it ends.
Follow = AsyncGenerator[tuple[ResponseFold, list[dict[str, Any]]], None]


class ResponseGone(Exception):
    """The response was deleted (or expired) while it was followed."""


def error_of(state: ResponseFold) -> APIError:
    """The HTTP error a waiting request gets for a failed response."""
    status = state.error_status or 500
    error = state.error or {}
    return APIError(status, error.get("message", "The response failed."),
                    type="invalid_request_error" if status < 500 else "server_error", code=state.error_code,
                    param=state.error_param)


class Responses:
    """Built once per API process (``app.state.responses``)."""

    def __init__(self, store: ResponseStore, tail: StreamTail, jobs: Jobs, settings: Settings) -> None:
        self.store = store
        self._tail = tail
        self._jobs = jobs
        self._settings = settings

    def __repr__(self) -> str:
        return f"Responses(store={self.store!r})"

    # ------------------------------------------------------------- create

    async def create(self, body: ResponseCreateRequest, api_key: NamedKey | None,
                     max_queue_s: float | None = None) -> StoredResponse:
        """Store the request and send its job; returns at once (the job may still wait in the queue,
        ``max_queue_s`` at most: ``api/jobs/waiting.py``)."""
        history = await self._history(body.previous_response_id) if body.previous_response_id else []
        instructions = [Message(role="system", content=body.instructions)] if body.instructions else []
        turn = to_messages(body.items())
        if not turn and not history:
            raise invalid("input", "'input' is required: give the model something to answer.")
        messages = instructions + history + turn
        if len(messages) > self._settings.max_messages:
            raise invalid("input", f"The conversation holds {len(messages)} messages; this server takes at most "
                          f"{self._settings.max_messages} (LLMQ_MAX_MESSAGES).")
        response_id = f"resp_{uuid.uuid4().hex}"
        await self._jobs.admit(body.model, "chat", response_id)
        now = time.time()
        job = body.job(response_id, messages, self.store.stream_key(response_id), now)
        job = job.model_copy(update={"max_queue_s": max_queue_s, "share": self._jobs.share(job, api_key)})
        record = StoredResponse(id=response_id, created_at=int(now), model=body.model, background=body.background,
                                store=body.store, echo=body.echo(), input_items=body.listed_items(), job=job,
                                context_start=len(instructions), api_key=api_key.name if api_key else None)
        try:
            await self.store.create(record)
            await self._jobs.send(job)
        except BaseException:
            await asyncio.shield(self._undo(record))
            raise
        log.info("response %s job %s: queued for %s (background=%s stream=%s store=%s, %d messages)", response_id,
                 job.job_id, body.model, body.background, body.stream, body.store, len(messages),
                 extra={"response_id": response_id, "job_id": job.job_id, "model": body.model})
        return record

    async def _undo(self, record: StoredResponse) -> None:
        await self._jobs.leave_queue(record.model, record.job.job_id)
        await self.store.drop(record.id)

    async def _history(self, previous_id: str) -> list[Message]:
        """The conversation a ``previous_response_id`` continues: its input
        (and what it continued), then its output."""
        previous = await self.store.visible(previous_id, "previous_response_id", "previous_response_not_found")
        state = await self.state(previous)
        if not state.ended:
            raise invalid("previous_response_id", f"The response '{previous_id}' is still {state.status}; continue "
                          "it once it has ended.")
        turn = state.assistant_turn()
        return previous.conversation() + ([turn] if turn is not None else [])

    # ------------------------------------------------------------- reading

    async def state(self, record: StoredResponse) -> ResponseFold:
        """The response now: a fold of every entry of its stream."""
        state = ResponseFold(record)
        state.opening()
        for entry_id, fields in await self.store.entries(record.id):
            state.feed(entry_id, fields)
        return state

    async def follow(self, record: StoredResponse) -> Follow:
        """The fold as entries arrive: (state, the events they added), until
        the response ends. Raises ``ResponseGone`` if it is deleted meanwhile."""
        state = ResponseFold(record)
        yield state, state.opening()
        async with self._tail.follow(self.store.stream_key(record.id), "0-0") as follower:
            while not state.ended:
                try:
                    batch = await asyncio.wait_for(follower.queue.get(), EXISTS_CHECK_S)
                except TimeoutError:
                    if await self.store.get(record.id) is None:
                        raise ResponseGone(record.id) from None
                    continue
                events: list[dict[str, Any]] = []
                for entry_id, fields in batch:
                    events += state.feed(entry_id, fields)
                yield state, events

    async def wait(self, record: StoredResponse, *, started: bool) -> tuple[ResponseFold, list[dict[str, Any]],
                                                                         Follow | None]:
        """Follow until the job started (``started``) or the response ended.
        Returns the state, the events so far, and the follow to go on with
        (None once it ended). Cancelled meanwhile (its client hung up:
        ``api/jobs/hangup.py``), it cancels the job: that client never got the
        response's id."""
        events: list[dict[str, Any]] = []
        follow = self.follow(record)
        try:
            async for state, new in follow:
                events += new
                if state.ended or (started and state.worker is not None):
                    break
            else:
                raise AssertionError("a follow ends only with its response")
        except ResponseGone:
            raise response_not_found(record.id) from None
        except BaseException as exc:
            await follow.aclose()
            if isinstance(exc, asyncio.CancelledError):
                log.info("response %s: its request ended before the answer (client gone); cancelling its job",
                         record.id, extra={"response_id": record.id, "job_id": record.job.job_id})
                await asyncio.shield(self.cancel_jobs(record))
            raise
        if state.ended:
            await follow.aclose()
            return state, events, None
        return state, events, follow

    # ------------------------------------------------------------- acting

    async def cancel_jobs(self, record: StoredResponse) -> None:
        """End the response as cancelled, and its job, whichever attempt runs it."""
        await self.store.append(record.id, Mark(kind="cancelled"))
        for job_id in attempt_ids(record.job.job_id):
            await self._jobs.cancel(job_id)

    async def cancel(self, response_id: str) -> dict[str, Any]:
        record = await self.store.visible(response_id)
        state = await self.state(record)
        if not state.ended:
            await self.cancel_jobs(record)
            log.info("response %s job %s: cancelled by the client", record.id, state.job_id,
                     extra={"response_id": record.id, "job_id": state.job_id})
            state = await self.state(record)
        return state.response()

    async def delete(self, response_id: str) -> dict[str, Any]:
        record = await self.store.visible(response_id)
        state = await self.state(record)
        if not state.ended:
            await self.cancel_jobs(record)
        await self.store.delete(response_id)
        log.info("response %s: deleted", response_id, extra={"response_id": response_id})
        return {"id": response_id, "object": "response", "deleted": True}

    async def give_up(self, record: StoredResponse, state: ResponseFold) -> None:
        """A request that waited is gone before the end: a ``store: false``
        response can never be read again, so its job is cancelled; a stored
        one runs on (its client may resume it through any API process)."""
        if not record.store and not state.ended:
            log.info("response %s: client gone, and the response is not stored; cancelling", record.id)
            await self.cancel_jobs(record)
