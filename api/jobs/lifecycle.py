"""The one job lifecycle in the API, whatever surface asked for the job:

    admit      a live worker serves the model as this kind, and the model's
               queue has room (counted in Redis, across API processes);
               per-key limits are admitted per request (``api/auth.py``)
    send       one Celery message on the model's queue (a batch line: its
               batch queue) at the job's priority
    watch      ``watch`` judges a job from what is known of it: not started
               in time, its worker gone, or silent too long
    resubmit   a job whose worker died before any token reached its client
               runs again under ``attempt_id(base, n)``, at most
               ``MAX_RESUBMITS`` times
    release    leave the queue bound; cancel the job if it did not end

Each surface supplies only where a job's events go and follows them there:
an interactive request over its API process's reply channel
(``api/jobs/interactive.py``), a response over its Redis stream
(``api/responses/keeper.py``), a batch line through its stored result
(``api/batches/keeper.py``; kombu's redelivery stands in for resubmission,
since nobody sees a line's tokens before its end).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from api.errors import (
    APIError,
    max_queue_time_exceeded,
    model_not_found,
    no_live_worker,
    queue_full,
    wrong_model_kind,
)
from api.jobs.waiting import retry_after_s
from api.keys import NamedKey, RateLimiter
from api.metrics import Metrics
from broker import fairness
from broker.celery_app import GENERATE_TASK
from broker.control import admit, give_up_queued, leave_waiting, request_cancel
from broker.keys import Keys, batch_queue_name, queue_name
from broker.registry import Registry
from broker.schemas import AdapterEntry, Job, ModelInfo, Share
from broker.settings import Settings

log = logging.getLogger("llmq.api.jobs")

# The header every answer names its job in (the id a client quotes to an operator).
JOB_ID_HEADER = "x-request-id"
# A job whose worker dies before its client got a token is sent again, this often.
MAX_RESUBMITS = 2
ATTEMPT_SEPARATOR = "~"


def attempt_id(base: str, attempt: int) -> str:
    """The id of a job's ``attempt``-th resubmission (0: the first sending)."""
    return base if attempt == 0 else f"{base}{ATTEMPT_SEPARATOR}{attempt}"


def attempt_ids(base: str) -> list[str]:
    """Every id a job may have run under."""
    return [attempt_id(base, n) for n in range(MAX_RESUBMITS + 1)]


def base_id(job_id: str) -> str:
    return job_id.split(ATTEMPT_SEPARATOR)[0]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``watch`` decided for a job that is not well: send it again
    (``resubmit``), or end it with this error."""

    resubmit: bool
    status: int = 0
    code: str = ""
    message: str = ""

    def error(self) -> APIError:
        return APIError(self.status, self.message, type="server_error", code=self.code)


RESUBMIT = Verdict(resubmit=True)


def not_started(settings: Settings, what: str) -> Verdict:
    return Verdict(False, 504, "queue_timeout", f"No worker started the {what} within "
                   f"{settings.first_event_timeout_s:.0f} s.")


def watch(settings: Settings, *, what: str, worker: str | None, alive: bool, tokens_out: bool, attempt: int,
          waited_s: float, silent_s: float) -> Verdict | None:
    """The rule for a job that is followed, the same for every surface.

    ``worker`` started the job (None: not yet), ``alive`` whether it still
    beats; ``tokens_out`` whether any of its tokens may have reached the
    client; ``waited_s`` since the job was sent, ``silent_s`` since its last
    event. None: all is well, keep following."""
    if worker is None:
        return not_started(settings, what) if waited_s > settings.first_event_timeout_s else None
    if not alive:
        if not tokens_out and attempt < MAX_RESUBMITS:
            return RESUBMIT
        return Verdict(False, 502, "worker_lost", f"The worker running this {what} ({worker}) stopped before it "
                       "finished; the answer is incomplete. Retry the request.")
    if silent_s > settings.event_timeout_s:
        return Verdict(False, 504, "worker_timeout", f"The worker sent nothing for {settings.event_timeout_s:.0f} s; "
                       f"the {what} was abandoned.")
    return None


def check_kind(model: str, info: ModelInfo | None, kind: str) -> None:
    """A model no worker ever served (404), or one of another kind (400):
    as a request is refused, and a batch line too (``api/batches/lines.py``)."""
    if info is None:
        raise model_not_found(model)
    if info.kind != kind:
        raise wrong_model_kind(model, info.kind)


def _send_job(celery: Celery, job: Job) -> None:
    """One Celery message at the job's priority (blocking: call it off the event loop)."""
    # Past its deadline (a batch line: its batch's window) Celery drops the
    # message as it arrives at a worker, before any engine work, and Flower
    # shows the task as revoked (the worker's claim checks it again).
    deadline = job.batch.expires_at if job.batch is not None else job.queue_deadline()
    celery.send_task(
        GENERATE_TASK,
        kwargs={"job": job.model_dump(mode="json")},
        queue=batch_queue_name(job.model) if job.batch is not None else job.queue or queue_name(job.model),
        task_id=job.job_id,
        priority=job.priority,
        expires=None if deadline is None else datetime.fromtimestamp(deadline, UTC),
        # Whose job it is: kept in its tenant's list under kombu's (broker/transport.py).
        headers=None if job.share is None else {fairness.HEADER: fairness.header(job.share)},
        # No result backend: results travel over the job's reply channel.
        ignore_result=True,
        # Flower shows this instead of the arguments: never the prompt.
        argsrepr="()",
        kwargsrepr=json.dumps(job.summary()),
    )


class Jobs:
    """The lifecycle's steps, built once at start-up (``app.state.jobs``)."""

    def __init__(self, settings: Settings, r: aioredis.Redis, keys: Keys, registry: Registry, celery: Celery,
                 metrics: Metrics, limiter: RateLimiter) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter
        self.registry = registry
        self._redis = r
        self._keys = keys
        self._celery = celery

    def __repr__(self) -> str:
        return f"Jobs(max_queue_depth={self.settings.max_queue_depth}, max_resubmits={MAX_RESUBMITS})"

    # ------------------------------------------------------------- admit

    async def admit(self, model: str, kind: str, job_id: str) -> bool:
        """A live worker serves ``model`` as ``kind`` (or it is declared and
        may wait for one: False), and its queue takes ``job_id`` (the queue
        bound: counted atomically in Redis, across API processes, until
        ``release``). Raises the APIError to answer."""
        live = (await self.registry.live_models()).get(model)
        loading = live is None and await self._loading(model)
        if live is not None:
            check_kind(model, live.info, kind)
        elif loading:
            if kind != "chat":
                raise wrong_model_kind(model, "chat")
        else:
            declared = self.settings.declared(model)
            if declared is None or self.settings.wait_for_worker_s <= 0:
                known = declared is not None or await self.registry.ever_served(model)
                raise no_live_worker(model) if known else model_not_found(model)
            if declared.kind != kind:
                raise wrong_model_kind(model, declared.kind)
        bound = self.settings.max_queue_depth
        admitted = await admit(self._redis, self._keys, model, job_id, bound, self.settings.first_event_timeout_s)
        if admitted < 0:
            raise queue_full(model, -admitted, await self.retry_after(model, -admitted))
        return live is not None or loading

    async def _loading(self, model: str) -> bool:
        """``model`` is an adapter just loaded through the API whose base has
        a live worker that has not announced it yet (``api/admin.py``): its
        jobs wait in the queue for that worker's next heartbeat."""
        entry = await self._catalogued(model)
        return entry is not None and entry.base in await self.registry.live_models()

    async def _catalogued(self, model: str) -> AdapterEntry | None:
        raw = await self._redis.hget(self._keys.adapters(), model)
        return None if raw is None else AdapterEntry.model_validate_json(raw)

    async def retry_after(self, model: str, waiting: int | None = None) -> int:
        """When a client refused for ``model`` should come back: its queue's
        depth over its live workers' drain rate (``api/jobs/waiting.py``)."""
        if waiting is None:
            waiting = int(await self._redis.zcard(self._keys.waiting(model)))
        live = (await self.registry.live_models()).get(model)
        drain = 0.0 if live is None else sum(m.jobs_per_s for w in live.workers for m in w.models if m.name == model)
        return retry_after_s(waiting, drain, self.settings)

    async def give_up(self, job: Job) -> APIError | None:
        """``job`` is past its queue deadline: drop it unless a worker claimed
        it first. The error to answer, or None if it runs after all."""
        if not await give_up_queued(self._redis, self._keys, job.model, job.job_id, self.settings.cancel_ttl_s):
            return None
        return await self.expired(job)

    async def no_worker_came(self, job: Job) -> APIError | None:
        """``job``, for a declared model with no live worker, waited
        ``wait_for_worker_s`` and none came: drop it unless one claimed it
        just now. Retry-After is the longest: a worker's start is unknown."""
        if not await give_up_queued(self._redis, self._keys, job.model, job.job_id, self.settings.cancel_ttl_s):
            return None
        waited = time.time() - job.submitted_at
        log.warning("job %s: no worker for %s came in %.1f s (LLMQ_WAIT_FOR_WORKER_S); dropped unrun", job.job_id,
                    job.model, waited)
        return no_live_worker(job.model, waited, self.settings.max_retry_after_s)

    async def expired(self, job: Job) -> APIError:
        """The answer for a job dropped past its queue deadline (here or by a worker), counted."""
        waited = time.time() - job.submitted_at
        self.metrics.expired.labels(job.model).inc()
        log.warning("job %s: still queued for %s after %.1f s, past its max queue time of %g s; dropped unrun",
                    job.job_id, job.model, waited, job.max_queue_s or 0)
        return max_queue_time_exceeded(job.model, waited, job.max_queue_s or 0, await self.retry_after(job.model))

    # -------------------------------------------------------------- send

    def share(self, job: Job, key: NamedKey | None) -> Share | None:
        """Whose job this is, for fair share between keys (None: fair share is off)."""
        if not self.settings.fair_share:
            return None
        return Share(tenant=key.name if key is not None else fairness.ANONYMOUS,
                     weight=key.weight if key is not None else 1.0, estimate=fairness.estimate(job))

    async def send(self, job: Job) -> None:
        job = await self.route(job)
        # On asyncio's own executor, whose threads live as long as the
        # process: Celery builds its result backend once per thread that
        # sends (scanning every installed package's entry points, ~6 ms),
        # and the threadpool Starlette offers ends threads idle for 10 s.
        await asyncio.to_thread(_send_job, self._celery, job)

    async def route(self, job: Job) -> Job:
        """LoRA adapter affinity: an adapter's job goes to the adapter's own
        queue, which only workers holding it in a slot take from
        (``worker/intake.py``), when one of them has room; otherwise to its
        base's queue, where any worker of the base takes it and loads it.
        Every other job goes to its model's queue."""
        if not self.settings.lora_affinity or job.batch is not None:
            return job
        live = (await self.registry.live_models()).get(job.model)
        if live is None:  # an adapter just loaded, not announced yet, goes to its base's queue
            entry = await self._catalogued(job.model)
            return job if entry is None else job.model_copy(update={"queue": queue_name(entry.base)})
        if live.info.parent is None:
            return job
        if any(w.running < w.capacity and any(m.name == job.model and m.resident for m in w.models)
               for w in live.workers):
            return job.model_copy(update={"queue": None})
        return job.model_copy(update={"queue": queue_name(live.info.parent)})

    def send_now(self, jobs: Iterable[Job]) -> None:
        """Send several jobs from a worker thread (a batch's lines)."""
        for job in jobs:
            _send_job(self._celery, job)

    # ------------------------------------------------------------- watch

    async def live_workers(self) -> set[str] | None:
        """Ids of the workers that beat now; None if Redis cannot say."""
        try:
            return {w.worker_id for w in await self.registry.workers()}
        except RedisError:
            return None

    # ---------------------------------------------------------- resubmit

    def next_attempt(self, job: Job, attempt: int) -> Job:
        """The job as its ``attempt``-th resubmission sends it."""
        return job.model_copy(update={"job_id": attempt_id(base_id(job.job_id), attempt),
                                      "submitted_at": time.time()})

    # ----------------------------------------------------------- release

    async def leave_queue(self, model: str, job_id: str) -> None:
        """The job started or ended: it no longer counts against the queue bound."""
        await leave_waiting(self._redis, self._keys, model, job_id)

    async def cancel(self, job_id: str) -> None:
        """The worker skips the job if still queued, or stops it at its next step."""
        await request_cancel(self._redis, self._keys, job_id, self.settings.cancel_ttl_s)

    async def count_tokens(self, key: NamedKey, tokens: int) -> None:
        """A finished job's tokens, against its API key's limits."""
        self.metrics.key_tokens.labels(key.name).inc(tokens)
        try:
            await self.limiter.count_tokens(key, tokens)
        except RedisError as exc:  # the answer is out; a lost count is logged, not raised
            log.warning("could not count %d tokens for API key %s: %s", tokens, key.name, exc)
