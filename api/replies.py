"""One subscription per API process to its own reply channel; events are
routed to per-job queues. Workers publish on the channel named in the job, so
several API processes share one Redis without seeing each other's tokens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.schemas import AnyEvent, Error, parse_event

log = logging.getLogger("llmq.api.replies")

RESUBSCRIBE_DELAY_S = 0.5


class ReplyRouter:
    def __init__(self, r: aioredis.Redis, channel: str) -> None:
        self._redis = r
        self.channel = channel
        self._queues: dict[str, asyncio.Queue[AnyEvent]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def __repr__(self) -> str:
        return f"ReplyRouter(channel={self.channel!r}, open_jobs={len(self._queues)})"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmq-reply-router")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def open(self, job_id: str) -> asyncio.Queue[AnyEvent]:
        """Register a job before its task is sent, so no event can be missed."""
        q: asyncio.Queue[AnyEvent] = asyncio.Queue()
        self._queues[job_id] = q
        return q

    def attach(self, job_id: str, q: asyncio.Queue[AnyEvent]) -> None:
        """Route a resubmitted job's events into an existing queue."""
        self._queues[job_id] = q

    def close(self, job_id: str) -> None:
        self._queues.pop(job_id, None)

    async def _run(self) -> None:
        while True:
            try:
                async for event in self._listen():
                    q = self._queues.get(event.job_id)
                    if q is not None:  # events of a job whose client left are dropped
                        q.put_nowait(event)
            except (RedisConnectionError, OSError) as exc:
                self._subscribed.clear()
                log.warning("reply channel %s lost (%s); failing %d open job(s), resubscribing", self.channel, exc,
                            len(self._queues))
                self._fail_open_jobs()
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    def _fail_open_jobs(self) -> None:
        """Events published while we were disconnected are gone: tell every
        waiting job now rather than let it wait for a timeout."""
        for job_id, q in list(self._queues.items()):
            q.put_nowait(Error(job_id=job_id, seq=0, status=503, error_type="service_unavailable_error",
                               code="broker_unavailable",
                               message="The connection to the job queue (Redis) was lost; the job's outcome is "
                                       "unknown. Retry the request."))

    async def _listen(self) -> AsyncIterator[AnyEvent]:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            self._subscribed.set()
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                try:
                    yield parse_event(message["data"])
                except ValidationError as exc:
                    log.error("dropped a malformed event on %s: %s", self.channel, exc)
        finally:
            await pubsub.aclose()


async def next_event(q: asyncio.Queue[AnyEvent], timeout_s: float) -> AnyEvent | None:
    try:
        return await asyncio.wait_for(q.get(), timeout=timeout_s)
    except asyncio.TimeoutError:
        return None
