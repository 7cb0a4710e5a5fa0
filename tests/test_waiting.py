"""How long a job may wait and when to come back (``api/jobs/waiting.py``):
the max queue time's sources, and a Retry-After that grows with the queue,
read from a real redis-server and real heartbeats."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

from api.errors import APIError
from api.jobs.lifecycle import Jobs
from api.jobs.waiting import MAX_QUEUE_TIME_HEADER, max_queue_s, retry_after_s
from api.keys import NamedKey
from api.metrics import Metrics
from broker.keys import Keys
from broker.registry import Registry, announce
from broker.schemas import Heartbeat, ModelInfo
from broker.settings import Settings


def test_the_header_wins_then_the_key_then_the_server() -> None:
    settings = Settings(max_queue_time_s=20, first_event_timeout_s=600)
    key = NamedKey(name="team", key="k", max_queue_time_s=5)
    plain = NamedKey(name="plain", key="k2")
    assert max_queue_s({MAX_QUEUE_TIME_HEADER: "2.5"}, key, settings) == 2.5
    assert max_queue_s({}, key, settings) == 5
    assert max_queue_s({}, plain, settings) == 20
    assert max_queue_s({}, None, Settings()) is None  # no deadline of its own: first_event_timeout_s
    assert max_queue_s({MAX_QUEUE_TIME_HEADER: "9999"}, None, settings) == 600  # capped
    with pytest.raises(APIError) as bad:
        max_queue_s({MAX_QUEUE_TIME_HEADER: "later"}, None, settings)
    assert bad.value.status == 400 and bad.value.param == MAX_QUEUE_TIME_HEADER


def test_retry_after_is_depth_over_drain_rate_within_bounds() -> None:
    settings = Settings(retry_after_s=1, max_retry_after_s=60)
    assert retry_after_s(10, 0.0, settings) == 1  # no drain rate known
    assert [retry_after_s(n, 2.0, settings) for n in (1, 8, 40, 500)] == [1, 4, 20, 60]


def test_retry_after_grows_with_the_queue(redis_url: str) -> None:
    """Two workers finishing 1.5 and 0.5 jobs/s drain the model's queue at 2/s."""
    keys, settings = Keys("llmq:"), Settings(redis_url=redis_url, retry_after_s=1, max_retry_after_s=60)
    r = redis.Redis.from_url(redis_url)
    now = time.time()
    for worker, rate in (("w1", 1.5), ("w2", 0.5)):
        announce(r, keys, Heartbeat(worker_id=worker, models=[ModelInfo(name="m", queue="llmq.m", context_length=64,
                                                                        kind="chat", jobs_per_s=rate)],
                                    device="cpu", capacity=4, running=4, tokens_per_s=100.0, version="test",
                                    started_at=now, beat_at=now), 60_000)

    async def after(depth: int) -> int:
        ar = aioredis.Redis.from_url(redis_url)
        await ar.delete(keys.waiting("m"))
        if depth:
            await ar.zadd(keys.waiting("m"), {f"j{i}": now for i in range(depth)})
        jobs = Jobs(settings, ar, keys, Registry(ar, keys, cache_s=0), None, Metrics(), None)  # type: ignore[arg-type]
        return await jobs.retry_after("m")

    figures = [asyncio.run(after(depth)) for depth in (2, 16, 64, 400)]
    assert figures == [1, 8, 32, 60], figures


def test_declared_models_come_as_json_or_from_a_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    listed = '[{"name": "cold", "kind": "chat", "context_length": 4096}]'
    monkeypatch.setenv("LLMQ_MODELS", listed)
    assert [(m.name, m.context_length) for m in Settings().models] == [("cold", 4096)]
    (tmp_path / "models.json").write_text(listed)
    monkeypatch.setenv("LLMQ_MODELS", str(tmp_path / "models.json"))
    assert Settings().declared("cold") is not None and Settings().declared("warm") is None
    monkeypatch.setenv("LLMQ_MODELS", '[{"name": "x", "context_length": 0}]')
    with pytest.raises(ValueError):
        Settings()
