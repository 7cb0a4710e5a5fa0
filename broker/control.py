"""Per-job control state in Redis: cancellation and the run-once claim.

The API cancels (async client); the worker checks and claims (sync client).
"""

from __future__ import annotations

import enum
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


class Claim(enum.Enum):
    NEW = 1  # first delivery: run it
    TAKEN_OVER = 2  # its claimer died before starting it: run it here
    HELD = 0  # a live worker has it, or it started: skip (the API resubmits or fails those; a batch line
    #           with no result goes back to the queue, worker/runtime.py)
    EXPIRED = 3  # still queued past its deadline (Job.max_queue_s): dropped before any engine work


# The error code of a job dropped past its queue deadline (a 429 to its client).
MAX_QUEUE_TIME_EXCEEDED = "max_queue_time_exceeded"

# What a job's claim holds once it was dropped past its queue deadline, by the
# worker that found it late or by the API giving up on it (``give_up_queued``):
# whichever comes first, the other sees it and agrees. No worker id looks so.
EXPIRED_HOLDER = "-expired"

# Claim a job (KEYS[1]) for ARGV[1]. A job still unclaimed past its deadline
# (ARGV[5], 0 for none; ARGV[6] is now) is marked expired instead. A copy
# redelivered after its worker died may take the claim over, but only if that
# worker never published Started (KEYS[2]) and its registry entry (ARGV[3] ..
# holder) is gone. Whichever way, the job (ARGV[4]) has left its queue: it no
# longer counts against the model's queue bound (KEYS[3], ``admit``).
_CLAIM = """
redis.call('ZREM', KEYS[3], ARGV[4])
local holder = redis.call('GET', KEYS[1])
if holder == false then
  local deadline = tonumber(ARGV[5])
  if deadline > 0 and tonumber(ARGV[6]) > deadline then
    redis.call('SET', KEYS[1], ARGV[7], 'EX', ARGV[2])
    return 3
  end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if holder == ARGV[7] then return 3 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('EXISTS', ARGV[3] .. holder) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 2
"""


def claim(r: redis.Redis, keys: Keys, model: str, job_id: str, worker_id: str, ttl_s: int,
          deadline: float | None = None) -> Claim:
    """Whether this worker runs this delivery of the job (atomic in Redis)."""
    return Claim(int(r.eval(_CLAIM, 3, keys.claim(job_id), keys.started(job_id), keys.waiting(model), worker_id,
                            ttl_s, keys.worker(""), job_id, deadline or 0, time.time(), EXPIRED_HOLDER)))


# The API gives up a job past its queue deadline (KEYS[1], its claim), unless
# a worker claimed it first: then it runs, and the API waits for it.
_GIVE_UP = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
if holder == ARGV[1] then return 1 end
return 0
"""


async def give_up_queued(r: aioredis.Redis, keys: Keys, model: str, job_id: str, ttl_s: int) -> bool:
    """Drop a job past its queue deadline: True if no worker had claimed it
    (none will now), False if one had (it runs)."""
    return bool(await r.eval(_GIVE_UP, 2, keys.claim(job_id), keys.waiting(model), EXPIRED_HOLDER, ttl_s, job_id))


# Drop KEYS[1] (a claim) if ARGV[1] holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def release(r: redis.Redis, keys: Keys, job_id: str, worker_id: str) -> None:
    """This worker gives the job back to the queue: the copy it puts back
    must find no claim, or it would be skipped as a duplicate."""
    r.eval(_RELEASE, 1, keys.claim(job_id), worker_id)


def linger(r: redis.Redis, keys: Keys, job_id: str, ttl_s: int) -> None:
    """The job ran to its end here: its claim and started mark expire soon."""
    with r.pipeline(transaction=False) as pipe:
        pipe.expire(keys.claim(job_id), ttl_s)
        pipe.expire(keys.started(job_id), ttl_s)
        pipe.execute()


def started_mark(keys: Keys, job_id: str, ttl_s: int) -> tuple[str | int, ...]:
    """The command after which no redelivered copy of the job may run. The
    worker sends it in the same write as the job's Started event, just
    before it, so it is in Redis before any of the job's events is."""
    return ("SET", keys.started(job_id), "1", "EX", ttl_s)


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
