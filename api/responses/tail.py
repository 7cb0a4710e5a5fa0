"""One blocking XREAD per API process over every response stream its
clients follow, so that following a response costs no Redis connection of
its own (a blocked XREAD holds one for as long as it waits).

Each follower says where it is (the last entry id it has); the tail reads
each stream from the earliest position among its followers and hands every
follower the entries past its own. A follower that joins wakes the read
with CLIENT UNBLOCK, so it waits for no timeout; if that races the read,
``BLOCK_MS`` bounds the wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.responses.events import Entry

log = logging.getLogger("llmq.api.responses.routes")

BLOCK_MS = 1000
COUNT = 1000  # entries per stream per read
RETRY_S = 0.5


def _pos(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(eq=False)
class Follower:
    key: str
    after: str
    queue: asyncio.Queue[list[Entry]] = field(default_factory=asyncio.Queue)


class StreamTail:
    """Built once per API process (``app.state.response_tail``); ``start``/``stop`` in the lifespan."""

    def __init__(self, r: aioredis.Redis) -> None:
        self._redis = r
        self._followers: set[Follower] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client_id: int | None = None  # the reading connection's, for CLIENT UNBLOCK
        self._reading = False
        self._unblocking: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"StreamTail(followers={len(self._followers)})"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="llmq-response-tail")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @asynccontextmanager
    async def follow(self, key: str, after: str) -> AsyncIterator[Follower]:
        """Entries of stream ``key`` past ``after`` arrive on the follower's queue, in order, while inside."""
        follower = Follower(key, after)
        self._followers.add(follower)
        self._wake()
        try:
            yield follower
        finally:
            self._followers.discard(follower)

    def _wake(self) -> None:
        self._changed.set()
        if self._reading and self._client_id is not None:
            task = asyncio.create_task(self._unblock(self._client_id))
            self._unblocking.add(task)  # a task nobody references may be collected before it ran
            task.add_done_callback(self._unblocking.discard)

    async def _unblock(self, client_id: int) -> None:
        try:
            await self._redis.client_unblock(client_id)
        except RedisError:
            pass  # the read ends by BLOCK_MS anyway

    async def _run(self) -> None:
        # Its own connection, held: CLIENT UNBLOCK names a connection.
        conn = aioredis.Redis(connection_pool=self._redis.connection_pool, single_connection_client=True)
        try:
            while True:
                if not self._followers:
                    await self._changed.wait()
                self._changed.clear()
                try:
                    await self._read(conn)
                except (RedisError, OSError) as exc:
                    self._client_id = None
                    log.warning("response tail: Redis read failed (%s); retrying", exc)
                    await asyncio.sleep(RETRY_S)
        finally:
            await conn.aclose()

    async def _read(self, conn: aioredis.Redis) -> None:
        streams: dict[str, str] = {}
        for f in self._followers:
            if f.key not in streams or _pos(f.after) < _pos(streams[f.key]):
                streams[f.key] = f.after
        if not streams:
            return
        if self._client_id is None:
            self._client_id = int(await conn.client_id())
        self._reading = True
        try:
            # A follower that joined since the streams were listed: read without blocking.
            block = None if self._changed.is_set() else BLOCK_MS
            reply = await conn.xread(streams, count=COUNT, block=block)  # type: ignore[arg-type]
        finally:
            self._reading = False
        for raw_key, raw_entries in reply or []:
            key = _text(raw_key)
            entries = [(_text(i), f) for i, f in raw_entries]
            for f in [f for f in self._followers if f.key == key]:
                mine = [e for e in entries if _pos(e[0]) > _pos(f.after)]
                if mine:
                    f.after = mine[-1][0]
                    f.queue.put_nowait(mine)
