"""A batch line whose result cannot be stored goes back to the queue, against
a real redis-server: the worker's runtime raises Celery's Reject(requeue=True)
instead of returning (which acknowledged the line and lost it), frees the
line's claim so the copy put back runs, and a line run again is stored once.
(That Celery puts a rejected message back and runs it again:
tests/test_pinned_internals.py.)"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis
from celery.exceptions import Reject

from broker import batches
from broker.keys import Keys
from broker.schemas import BatchLine, Job, LineResult
from broker.settings import Settings
from worker import lines as lines_module
from worker.engines.registry import EngineOptions
from worker.publish import Publisher
from worker.runtime import Runtime


def failing_once(real: Any, calls: list[str], name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        if calls.count(name) == 1:
            raise redis.ConnectionError("Connection refused (a test: Redis is down)")
        return real(*args, **kwargs)
    return call


def a_line(redis_url: str, batch_id: str, index: int) -> tuple[Keys, redis.Redis, Runtime, Job]:
    """A worker's runtime with no engine (the line is refused, model_not_found:
    a result to store like any other) and line ``index`` of a batch in progress."""
    settings = Settings(redis_url=redis_url, heartbeat_interval_s=0.2)
    keys = Keys(settings.key_prefix)
    r = redis.Redis.from_url(redis_url)
    rt = Runtime(settings, [], [], Publisher(r), EngineOptions(), worker_id="worker-a")
    r.hset(keys.batch(batch_id), "status", batches.IN_PROGRESS)
    job = Job(job_id=f"line-job-{index}", model="nobody", kind="completion", prompt="hi", reply_channel="",
              submitted_at=time.time(), batch=BatchLine(batch_id=batch_id, index=index, custom_id=f"c{index}",
                                                         expires_at=time.time() + 600))
    return keys, r, rt, job


def test_a_line_whose_result_cannot_be_stored_goes_back_to_the_queue_and_is_stored_once(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    keys, r, rt, job = a_line(redis_url, "b1", 3)
    calls: list[str] = []
    monkeypatch.setattr(batches, "record", failing_once(batches.record, calls, "record"))
    # Redis is still away when the worker frees the claim: it waits for it.
    monkeypatch.setattr(lines_module, "release", failing_once(lines_module.release, calls, "release"))

    with caplog.at_level(logging.ERROR, logger="llmq.worker"), pytest.raises(Reject) as rejected:
        rt.run(job)
    assert rejected.value.requeue
    assert calls == ["record", "release", "release"]
    assert "line 3 of batch b1 could not reach Redis" in caplog.text and "goes back to the queue" in caplog.text
    assert r.hlen(keys.batch_results("b1")) == 0
    assert not r.exists(keys.claim(job.job_id))  # the copy put back is not skipped as a duplicate

    # The copy put back runs (on this worker or another) and is stored.
    assert rt.run(job)["status"] == "model_not_found"
    stored = r.hgetall(keys.batch_results("b1"))
    assert list(stored) == [b"3"]
    result = LineResult.model_validate_json(stored[b"3"])
    assert result.custom_id == "c3" and result.failed
    # One more copy (a redelivery after a worker died, say) runs again but is not stored twice.
    r.delete(keys.claim(job.job_id))
    assert rt.run(job)["status"] == "model_not_found"
    assert r.hlen(keys.batch_results("b1")) == 1 and r.hget(keys.batch("b1"), "failed") == b"1"


def test_a_line_claimed_by_a_worker_that_looks_alive_goes_back_until_it_has_a_result(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A redelivered copy of a line whose claimer is still in the registry
    (it died between its beat and re-scoring what it held, so its message
    came back before its entry expired) is not acknowledged as a duplicate:
    that lost the line. It goes back to the queue while the line has no
    result; once the claimer has left the registry the copy takes the line
    over and runs it; once the line has a result a copy is dropped."""
    keys, r, rt, job = a_line(redis_url, "b2", 5)
    r.set(keys.claim(job.job_id), "worker-dead", ex=600)
    r.set(keys.worker("worker-dead"), "{}", px=60_000)  # its entry has not expired yet

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="llmq.worker"), pytest.raises(Reject) as rejected:
        rt.run(job)
    assert rejected.value.requeue and time.monotonic() - started >= 0.2  # not straight back: one beat
    assert "claimed by a worker that looks alive" in caplog.text
    assert r.hlen(keys.batch_results("b2")) == 0 and r.get(keys.claim(job.job_id)) == b"worker-dead"

    r.delete(keys.worker("worker-dead"))  # the entry expires: the next copy takes the line over
    assert rt.run(job)["status"] == "model_not_found"
    assert list(r.hgetall(keys.batch_results("b2"))) == [b"5"]

    r.set(keys.claim(job.job_id), "worker-dead", ex=600)
    r.set(keys.worker("worker-dead"), "{}", px=60_000)
    assert rt.run(job)["status"] == "duplicate"  # the line has its result: a late copy is dropped
    assert r.hlen(keys.batch_results("b2")) == 1 and r.hget(keys.batch("b2"), "failed") == b"1"
