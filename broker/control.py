"""Per-job control state in Redis: cancellation and the run-once claim.

The API cancels (async client); the worker checks and claims (sync client).
"""

from __future__ import annotations

import time

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


# Admit a job if fewer than ARGV[1] jobs of the model wait. Entries older than
# ARGV[3] seconds are dropped first, so a crashed API process cannot leak slots.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2] - ARGV[3])
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[1]) then return -waiting end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
return waiting + 1
"""


async def admit(r: aioredis.Redis, keys: Keys, model: str, job_id: str, bound: int, max_age_s: float) -> int:
    """Atomically count a job as waiting; returns the new count, or minus the
    current count when the model already has ``bound`` jobs waiting."""
    now = time.time()
    return int(await r.eval(_ADMIT, 1, keys.waiting(model), bound, now, max_age_s, job_id))


async def leave_waiting(r: aioredis.Redis, keys: Keys, model: str, job_id: str) -> None:
    await r.zrem(keys.waiting(model), job_id)
