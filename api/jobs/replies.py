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

from broker.schemas import AnyEvent, Error, parse_message

log = logging.getLogger("llmq.api.jobs.replies")

RESUBSCRIBE_DELAY_S = 0.5

# A job's events, and the None ticks its follower asks for (``Ticker``).
Mailbox = asyncio.Queue[AnyEvent | None]


class ReplyRouter:
    def __init__(self, r: aioredis.Redis, channel: str) -> None:
        self._redis = r
        self.channel = channel
        self._queues: dict[str, Mailbox] = {}
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

    def open(self, job_id: str) -> Mailbox:
        """Register a job before its task is sent, so no event can be missed.
        Refused while the channel is lost (Redis failed over, the router not
        yet subscribed to the new primary): the job's events would reach
        nobody, and its request would wait for them until a timeout."""
        if not self._subscribed.is_set():
            raise RedisConnectionError(f"reply channel {self.channel} is not subscribed yet")
        q: Mailbox = asyncio.Queue()
        self._queues[job_id] = q
        return q

    def attach(self, job_id: str, q: Mailbox) -> None:
        """Route a resubmitted job's events into an existing queue."""
        self._queues[job_id] = q

    def close(self, job_id: str) -> None:
        self._queues.pop(job_id, None)

    async def _run(self) -> None:
        while True:
            try:
                async for events in self._listen():
                    for event in events:
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

    async def _listen(self) -> AsyncIterator[list[AnyEvent]]:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            conn = pubsub.connection
            assert conn is not None
            # Replies are read straight off the subscribed connection: this
            # runs once per token, and redis-py's listen() adds a health check,
            # a retry wrapper and a message dict per reply. A lost connection
            # raises here, and _run fails the open jobs and subscribes anew.
            while True:
                reply = await conn.read_response(disconnect_on_error=False)
                if reply[0] == b"subscribe":
                    self._subscribed.set()
                    continue
                if reply[0] != b"message":
                    continue
                try:
                    yield parse_message(reply[2])
                except ValidationError as exc:
                    log.error("dropped a malformed event on %s: %s", self.channel, exc)
        finally:
            await pubsub.aclose()


async def next_event(q: Mailbox, timeout_s: float) -> AnyEvent | None:
    """The next event, or None after ``timeout_s``: the wait for a job's
    first event (a running job's events are followed with a ``Ticker``). The
    wait is a timer on this task, not a new task as ``wait_for`` makes."""
    try:
        async with asyncio.timeout(timeout_s):
            return await q.get()
    except TimeoutError:
        return None


class Ticker:
    """Puts None in a mailbox every ``every_s`` seconds until cancelled: one
    timer per job, where a timeout on every wait would cost one per token."""

    def __init__(self, q: Mailbox, every_s: float) -> None:
        self._q = q
        self._every_s = every_s
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(every_s, self._tick)

    def _tick(self) -> None:
        self._q.put_nowait(None)
        self._handle = self._loop.call_later(self._every_s, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()
