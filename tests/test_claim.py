"""The run-once claim (``broker/control.py``) against a real redis-server:
who runs a delivered copy, and that a claim takes the job off its model's
queue bound, so the API needs no write of its own for a job that started."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from broker.control import Claim, admit, claim, give_up_queued
from broker.keys import Keys


def test_a_claim_runs_a_job_once_and_takes_it_off_the_queue_bound(redis_url: str) -> None:
    keys = Keys("llmq:")
    r = redis.Redis.from_url(redis_url)

    async def admitted(job_id: str) -> int:
        return await admit(aioredis.Redis.from_url(redis_url), keys, "m", job_id, bound=2, max_age_s=600)

    assert asyncio.run(admitted("j1")) == 1 and asyncio.run(admitted("j2")) == 2
    assert asyncio.run(admitted("j3")) == -2  # the bound: two wait

    assert claim(r, keys, "m", "j1", "w1", 600) is Claim.NEW
    assert r.zrange(keys.waiting("m"), 0, -1) == [b"j2"]  # j1 left the queue with its claim
    assert asyncio.run(admitted("j3")) == 2

    r.set(keys.worker("w1"), "{}", px=60_000)
    assert claim(r, keys, "m", "j1", "w2", 600) is Claim.HELD  # its claimer lives
    r.delete(keys.worker("w1"))
    assert claim(r, keys, "m", "j1", "w2", 600) is Claim.TAKEN_OVER  # its claimer is gone, and it never started
    r.set(keys.started("j1"), "1")
    assert claim(r, keys, "m", "j1", "w3", 600) is Claim.HELD  # started: never again


def test_a_job_past_its_deadline_is_claimed_by_nobody(redis_url: str) -> None:
    """The worker that finds a job late and the API that gives up on it
    agree through one mark: whichever comes first, the other sees it."""
    keys = Keys("llmq:")
    r = redis.Redis.from_url(redis_url)
    past, future = time.time() - 1, time.time() + 60

    assert claim(r, keys, "m", "late", "w1", 600, past) is Claim.EXPIRED
    assert claim(r, keys, "m", "late", "w2", 600, future) is Claim.EXPIRED  # a copy finds the mark
    assert asyncio.run(give_up_queued(aioredis.Redis.from_url(redis_url), keys, "m", "late", 600))  # agrees

    assert asyncio.run(give_up_queued(aioredis.Redis.from_url(redis_url), keys, "m", "given-up", 600))
    assert claim(r, keys, "m", "given-up", "w1", 600, future) is Claim.EXPIRED  # the API was first

    assert claim(r, keys, "m", "in-time", "w1", 600, future) is Claim.NEW
    assert not asyncio.run(give_up_queued(aioredis.Redis.from_url(redis_url), keys, "m", "in-time", 600))
    assert r.get(keys.claim("in-time")) == b"w1"  # it runs; the API waits for it
