"""A batch line's run (``Runtime.run`` hands it here): run like any job,
but its events are kept and stored once as the line's result."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import redis
from celery.exceptions import Reject

from broker import batches
from broker.control import release
from broker.schemas import Job, LineResult

if TYPE_CHECKING:
    from worker.runtime import Runtime

log = logging.getLogger("llmq.worker")


def run_line(rt: Runtime, job: Job) -> dict[str, object]:
    """A batch line: run like any job, but its events are kept and
    stored once as the line's result. A line whose batch is no longer in
    progress (cancelled, expired) is stored as skipped, not run. A line
    that cannot reach Redis (down at that moment) goes back to the
    queue: acknowledged, it would be lost, and its batch would wait for
    it to the end of its window."""
    assert job.batch is not None
    line, jid = job.batch, job.job_id
    try:
        status = batches.batch_status(rt.redis, rt.keys, line.batch_id)
        expired = time.time() > line.expires_at
        if status != batches.IN_PROGRESS or expired:
            if status is None:  # the batch is gone (deleted, or past its keep time)
                return {"job_id": jid, "status": "batch_gone"}
            skipped = "batch_expired" if expired or status == batches.EXPIRED else "batch_cancelled"
            batches.record(rt.redis, rt.keys, line.batch_id, LineResult(
                index=line.index, custom_id=line.custom_id, job_id=jid, skipped=skipped,
                finished_at=time.time()))
            log.info("job %s: line %d of batch %s not run (%s)", jid, line.index, line.batch_id, skipped)
            return {"job_id": jid, "status": skipped}
        rt.publisher.keep(jid)
        try:
            try:
                result = rt.run_job(job)
            except Exception as exc:  # here, so that its error event is kept with the line's
                result = rt.crashed(job, exc)
        finally:
            events = rt.publisher.take(jid)
        if result.get("status") == "duplicate":
            if batches.has_result(rt.redis, rt.keys, line.batch_id, line.index):
                return result  # another copy of the line ran it
            # Its claimer still looks alive: a live worker runs it, or a
            # dead one whose registry entry outlived the visibility of its
            # message (it died between its beat and re-scoring what it
            # held). Acknowledged, this copy would be the line's last, and
            # its batch would wait for it to the end of its window: it
            # goes back to the queue, and comes again until the line has
            # a result or its claimer has left the registry.
            log.warning("job %s: line %d of batch %s is claimed by a worker that looks alive and has no result "
                        "yet; back to the queue in %.1f s", jid, line.index, line.batch_id,
                        rt.settings.heartbeat_interval_s)
            rt.stopping.wait(rt.settings.heartbeat_interval_s)
            raise Reject(f"line {line.index} of batch {line.batch_id}: claimed elsewhere, no result yet",
                         requeue=True)
        stored = batches.record(rt.redis, rt.keys, line.batch_id, LineResult(
            index=line.index, custom_id=line.custom_id, job_id=jid, events=events, finished_at=time.time()))
    except redis.RedisError as exc:
        log.error("job %s: line %d of batch %s could not reach Redis (%s: %s); it goes back to the queue and "
                  "runs again once Redis answers (its batch waits for it)", jid, line.index, line.batch_id,
                  type(exc).__name__, exc)
        # The copy put back must not find this run's claim, or it would be
        # skipped as a duplicate: so wait for Redis, however long it is
        # away. A worker that stops leaves the registry, which frees the
        # claim for a copy as well (broker/control.py).
        delay = 0.1
        while True:
            try:
                release(rt.redis, rt.keys, jid, rt.worker_id)
                break
            except redis.RedisError:
                if rt.stopping.wait(delay):
                    break
                delay = min(2 * delay, rt.settings.heartbeat_interval_s)
        raise Reject(f"line {line.index} of batch {line.batch_id}: no result stored", requeue=True) from exc
    if not stored:
        log.warning("job %s: line %d of batch %s already had a result; this run's is dropped", jid, line.index,
                    line.batch_id)
    return result
