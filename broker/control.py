"""Per-job control state in Redis: cancellation and the run-once claim.

The API cancels (async client); the worker checks and claims (sync client).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from broker.keys import Keys


async def request_cancel(r: aioredis.Redis, keys: Keys, job_id: str, ttl_s: int) -> None:
    """Mark a job cancelled (covers a job still queued) and tell running workers."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.set(keys.cancelled(job_id), b"1", ex=ttl_s)
        pipe.publish(keys.cancel_channel(), job_id)
        await pipe.execute()


def is_cancelled(r: redis.Redis, keys: Keys, job_id: str) -> bool:
    return bool(r.exists(keys.cancelled(job_id)))


def claim(r: redis.Redis, keys: Keys, job_id: str, worker_id: str, ttl_s: int) -> bool:
    """True for the first worker to claim this job; a redelivered copy gets False."""
    return bool(r.set(keys.claim(job_id), worker_id, nx=True, ex=ttl_s))
