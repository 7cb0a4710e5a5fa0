"""The API's registry cache against a real redis-server: requests that find
it stale together share one read of the heartbeats, not one read each."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from broker.keys import Keys
from broker.registry import Registry, announce
from broker.schemas import Heartbeat, ModelInfo


def beat(worker_id: str) -> Heartbeat:
    now = time.time()
    return Heartbeat(worker_id=worker_id, models=[ModelInfo(name="m", queue="llmq.m", context_length=2048, kind="chat")],
                     device="cpu", capacity=4, running=0, tokens_per_s=0.0, version="test", started_at=now,
                     beat_at=now)


def test_requests_that_find_the_cache_stale_share_one_read(redis_url: str) -> None:
    keys = Keys("llmq:")
    announce(redis.Redis.from_url(redis_url), keys, beat("w1"), 60_000)

    async def main() -> tuple[int, list[list[str]], list[str]]:
        registry = Registry(aioredis.Redis.from_url(redis_url), keys, cache_s=0.2)
        reads = 0
        real = registry._read_workers

        async def counted() -> list[Heartbeat]:
            nonlocal reads
            reads += 1
            return await real()

        registry._read_workers = counted  # type: ignore[method-assign]
        first = await asyncio.gather(*(registry.workers() for _ in range(50)))
        # A caller cancelled while the read is under way leaves it to the others.
        await asyncio.sleep(0.25)
        doomed = asyncio.ensure_future(registry.workers())
        waiting = asyncio.ensure_future(registry.workers())
        await asyncio.sleep(0)
        doomed.cancel()
        after = await waiting
        return reads, [[w.worker_id for w in ws] for ws in first], [w.worker_id for w in after]

    reads, first, after = asyncio.run(main())
    assert first == [["w1"]] * 50 and after == ["w1"]
    assert reads == 2  # one for the 50 together, one after the cache went stale
