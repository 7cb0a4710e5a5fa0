"""Submitting a job and following it: registry look-up, back-pressure, the
Celery send, the wait for the worker's first event, cancellation."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from api.errors import APIError, model_not_found, no_live_worker, queue_full, wrong_model_kind
from api.keys import NamedKey, RateLimiter
from api.metrics import JobFigures, Metrics
from api.protocol import ToolChoice
from api.replies import AnyEvent, Mailbox, ReplyRouter, Ticker, next_event
from broker.celery_app import GENERATE_TASK
from broker.control import admit, leave_waiting, request_cancel
from broker.keys import Keys, queue_name
from broker.registry import Registry
from broker.schemas import (
    DEFAULT_PRIORITY, Constraint, Delta, Done, Embeddings, Error, Job, Message, Sampling, Started, Tool,
)
from broker.settings import Settings

log = logging.getLogger("llmq.api.jobs")

# A job whose worker dies before its first token is sent again, this often.
MAX_RESUBMITS = 2


def error_from_event(ev: Error) -> APIError:
    return APIError(ev.status, ev.message, type=ev.error_type, code=ev.code, param=ev.param)


def send_job(celery: Celery, job: Job, queue: str) -> None:
    """One Celery message at the job's priority (blocking: call it off the event loop)."""
    celery.send_task(
        GENERATE_TASK,
        kwargs={"job": job.model_dump(mode="json")},
        queue=queue,
        task_id=job.job_id,
        priority=job.priority,
        # No result backend: results travel over the job's reply channel.
        ignore_result=True,
        # Flower shows this instead of the arguments: never the prompt.
        argsrepr="()",
        kwargsrepr=json.dumps(job.summary()),
    )


class Restarted:
    """Yielded by ``RunningJob.events`` when the job was resubmitted."""


@dataclass
class RunningJob:
    """A job whose worker has started it. Iterate ``events()`` to follow it."""

    job: Job
    started: Started
    _queue: Mailbox
    _jobs: "Jobs"
    accepted_at: float  # monotonic, when the API took the request
    finished: bool = False
    failed: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _open_choices: set[int] = field(default_factory=set)
    _first_token_at: float | None = None
    _last_token_at: float | None = None
    _gaps: list[float] = field(default_factory=list)
    _tokens: dict[int, int] = field(default_factory=dict)  # choice -> tokens so far
    _reasons: list[str] = field(default_factory=list)
    _error_code: str | None = None
    attempt: int = 0
    public_id: str = ""
    api_key: NamedKey | None = None  # counted against its limits when the job ends
    _ticker: Ticker | None = None  # while events() runs

    def __post_init__(self) -> None:
        self._open_choices = set(range(self.job.n))
        self.public_id = self.public_id or self.job.job_id

    @property
    def metrics(self) -> Metrics:
        return self._jobs.metrics

    def _track(self, ev: Delta | Done | Error) -> None:
        """Timings for metrics and the request log line."""
        now = time.monotonic()
        if isinstance(ev, Delta) and ev.completion_tokens > self._tokens.get(ev.index, 0):
            new = ev.completion_tokens - self._tokens.get(ev.index, 0)
            self._tokens[ev.index] = ev.completion_tokens
            if self._first_token_at is None:
                self._first_token_at = now
            elif self._last_token_at is not None:
                self._gaps.extend([(now - self._last_token_at) / new] * new)
            self._last_token_at = now
        elif isinstance(ev, Done):
            self._tokens[ev.index] = ev.usage.completion_tokens
            self._reasons.append(ev.finish_reason)
        elif isinstance(ev, Error):
            self._error_code = ev.code or ev.error_type

    @property
    def job_id(self) -> str:
        """The id the client sees; a resubmitted job keeps it."""
        return self.public_id

    async def events(self, *, client_saw_tokens: bool = True) -> AsyncIterator[Delta | Done | Error | Restarted]:
        """Deltas and each choice's Done until all are done or an Error.

        Between events the worker's heartbeat is watched: if the worker
        dies, a job that sent no token yet is resubmitted (a ``Restarted``
        marker tells the caller to drop what it collected; with
        ``client_saw_tokens=False`` that holds for tokens that never left
        the API), otherwise it ends with an Error. A live worker silent for
        ``event_timeout_s`` ends it too: no client ever hangs."""
        settings = self._jobs.settings
        limit = settings.event_timeout_s
        poll = min(settings.heartbeat_ttl_s / 2, limit)
        # Silence is looked at on ticks of half the poll, so it is seen
        # between one and one and a half polls after the last event.
        silent_since = looked_at = time.monotonic()
        ticker = self._ticker = Ticker(self._queue, poll / 2)
        try:
            while not self.finished:
                ev = await self._queue.get()
                if ev is not None and ev.job_id != self.job.job_id:
                    continue  # a late event of an attempt given up on
                if ev is None:
                    now = time.monotonic()
                    if now - looked_at < poll:
                        continue
                    looked_at = now
                    if not await self._jobs.worker_alive(self.started.worker):
                        ev = await self._worker_lost(client_saw_tokens)
                        if ev is None:  # resubmitted; a new worker has started it
                            silent_since = looked_at = time.monotonic()
                            yield Restarted()
                            continue
                    elif now - silent_since < limit:
                        continue
                    else:
                        ev = self._error(504, "worker_timeout", f"The worker sent nothing for {limit:.0f} s; "
                                         "the job was abandoned.")
                silent_since = looked_at = time.monotonic()
                if isinstance(ev, Delta | Done | Error):
                    self._track(ev)
                if isinstance(ev, Done):
                    self._open_choices.discard(ev.index)
                if isinstance(ev, Error):
                    self.failed = True
                if isinstance(ev, Error) or not self._open_choices:
                    self.finished = True
                if isinstance(ev, Delta | Done | Error):
                    yield ev
        finally:
            ticker.cancel()

    def _error(self, status: int, code: str, message: str) -> Error:
        return Error(job_id=self.job.job_id, seq=0, status=status, error_type="server_error", code=code,
                     message=message)

    async def _worker_lost(self, client_saw_tokens: bool) -> Error | None:
        """The worker running this job is gone (its heartbeat expired)."""
        dead = self.started.worker
        if (self._tokens and client_saw_tokens) or self.attempt >= MAX_RESUBMITS:
            log.warning("job %s: worker %s died after %d tokens; ending the job", self.job_id, dead,
                        sum(self._tokens.values()))
            return self._error(502, "worker_lost", f"The worker running this job ({dead}) stopped before it "
                               "finished; the answer is incomplete. Retry the request.")
        self.attempt += 1
        log.warning("job %s: worker %s died before the client got a token; resubmitting (attempt %d)", self.job_id,
                    dead, self.attempt + 1)
        self._tokens.clear()
        self._open_choices = set(range(self.job.n))
        try:
            self.job, self.started = await self._jobs.resubmit(self.job, self._queue, self.attempt)
        except APIError as exc:
            return self._error(exc.status, exc.code or "resubmit_failed", exc.message)
        return None

    async def close(self) -> None:
        """Always called: cancels the job on the worker unless it finished,
        then records the request's metrics and its one log line."""
        cancelled = not self.finished
        if self._ticker is not None:  # events() was left at a yield, not run to its end
            self._ticker.cancel()
        await self._jobs.release(self.job.job_id, cancel=cancelled)
        now = time.monotonic()
        status = "cancelled" if cancelled else f"error:{self._error_code}" if self.failed else ",".join(self._reasons)
        figures = JobFigures(
            model=self.job.model, prompt_tokens=self.started.prompt_tokens,
            completion_tokens=sum(self._tokens.values()), queue_s=self.started.queue_s,
            first_token_s=None if self._first_token_at is None else self._first_token_at - self.accepted_at,
            total_s=now - self.accepted_at, token_gaps_s=self._gaps,
            finish_reason=None if cancelled or self.failed else self._reasons[0] if self._reasons else None,
        )
        self._jobs.metrics.observe_job(figures)
        key_name = self.api_key.name if self.api_key is not None else "-"
        if self.api_key is not None:
            await self._jobs.count_tokens(self.api_key, figures.prompt_tokens + figures.completion_tokens)
        ttft = "-" if figures.first_token_s is None else f"{figures.first_token_s:.3f}"
        log.info(
            "job %s model=%s worker=%s key=%s status=%s prompt_tokens=%d completion_tokens=%d queue_s=%.3f "
            "ttft_s=%s total_s=%.3f", self.job_id, self.job.model, self.started.worker, key_name, status,
            figures.prompt_tokens, figures.completion_tokens, figures.queue_s, ttft, figures.total_s,
            extra={"job_id": self.job_id, "model": self.job.model, "worker": self.started.worker, "status": status,
                   "key_name": key_name,
                   "prompt_tokens": figures.prompt_tokens, "completion_tokens": figures.completion_tokens,
                   "queue_s": round(figures.queue_s, 4), "ttft_s": figures.first_token_s,
                   "total_s": round(figures.total_s, 4)},
        )


class Jobs:
    """Built once at start-up and kept on ``app.state``."""

    def __init__(
        self, settings: Settings, r: aioredis.Redis, keys: Keys, registry: Registry, router: ReplyRouter, celery: Celery,
        metrics: Metrics, limiter: RateLimiter,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limiter = limiter
        self._redis = r
        self._keys = keys
        self._registry = registry
        self._router = router
        self._celery = celery

    async def submit(
        self,
        *,
        model: str,
        kind: str,
        sampling: Sampling,
        n: int = 1,
        stop: list[str] | None = None,
        echo: bool = False,
        messages: list[Message] | None = None,
        prompt: str | list[int] | None = None,
        constraint: Constraint | None = None,
        tools: list[Tool] | None = None,
        tool_choice: ToolChoice = "none",
        tool_name: str | None = None,
        parallel_tool_calls: bool = True,
        priority: int = DEFAULT_PRIORITY,
        api_key: NamedKey | None = None,
        id_prefix: str,
    ) -> RunningJob:
        """Enqueue a generation job and wait until a worker starts it.
        Cancelled meanwhile (its client hung up: ``api/hangup.py``), it
        cancels the job, which the worker then skips without generating."""
        accepted_at = time.monotonic()
        queue = await self.admit(model, "chat")
        job_id = f"{id_prefix}-{uuid.uuid4().hex}"
        await self.enter_queue(model, job_id)
        job = Job(
            job_id=job_id,
            model=model,
            kind=kind,  # type: ignore[arg-type]
            messages=messages,
            prompt=prompt,
            sampling=sampling,
            n=n,
            stop=stop or [],
            echo=echo,
            constraint=constraint,
            tools=tools,
            tool_choice=tool_choice,
            tool_name=tool_name,
            parallel_tool_calls=parallel_tool_calls,
            reply_channel=self._router.channel,
            submitted_at=time.time(),
            priority=priority,
        )
        try:
            q = self._router.open(job.job_id)
            await self._send(job, queue)
            first = await self._first_event(q, job.job_id)
        except BaseException:
            await self.release(job.job_id, cancel=True)
            raise
        finally:
            await leave_waiting(self._redis, self._keys, model, job_id)
        if isinstance(first, Started):
            return RunningJob(job=job, started=first, _queue=q, _jobs=self, accepted_at=accepted_at, api_key=api_key)
        await self.release(job.job_id, cancel=False)
        if isinstance(first, Error):
            raise error_from_event(first)
        raise APIError(500, f"The worker's first event was {first.type}, not started.", type="server_error")

    async def _first_event(self, q: Mailbox, job_id: str) -> AnyEvent:
        """The first event of ``job_id`` (a shared queue may still hold an
        earlier attempt's). Raises 504 if none comes in time."""
        deadline = time.monotonic() + self.settings.first_event_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ev = await next_event(q, left)
            if ev is not None and ev.job_id == job_id:
                return ev
        raise APIError(504, f"No worker started the job within {self.settings.first_event_timeout_s:.0f} s.",
                       type="server_error", code="queue_timeout")

    async def resubmit(self, job: Job, q: Mailbox, attempt: int) -> tuple[Job, Started]:
        """Send ``job`` again under a new id whose events feed the same queue."""
        await self.release(job.job_id, cancel=True)  # in case the old worker was only slow
        again = job.model_copy(update={"job_id": f"{job.job_id.split('~')[0]}~{attempt}", "submitted_at": time.time()})
        self._router.attach(again.job_id, q)
        await self._send(again, queue_name(job.model))
        ev = await self._first_event(q, again.job_id)
        if isinstance(ev, Started):
            return again, ev
        if isinstance(ev, Error):
            raise error_from_event(ev)
        raise APIError(500, f"The worker's first event was {ev.type}, not started.", type="server_error")

    async def count_tokens(self, key: NamedKey, tokens: int) -> None:
        self.metrics.key_tokens.labels(key.name).inc(tokens)
        try:
            await self.limiter.count_tokens(key, tokens)
        except RedisError as exc:  # the answer is out; a lost count is logged, not raised
            log.warning("could not count %d tokens for API key %s: %s", tokens, key.name, exc)

    async def worker_alive(self, worker_id: str) -> bool:
        try:
            return any(w.worker_id == worker_id for w in await self._registry.workers())
        except RedisError:
            return True  # unknown; a lost Redis fails the job through the reply router

    async def embed(self, *, model: str, inputs: list[str] | list[list[int]], api_key: NamedKey | None = None
                    ) -> Embeddings:
        queue = await self.admit(model, "embedding")
        job_id = f"embd-{uuid.uuid4().hex}"
        await self.enter_queue(model, job_id)
        job = Job(job_id=job_id, model=model, kind="embedding", inputs=inputs,
                  reply_channel=self._router.channel, submitted_at=time.time())
        try:
            q = self._router.open(job.job_id)
            await self._send(job, queue)
            ev = await self._first_event(q, job.job_id)
        except BaseException:
            await self.release(job.job_id, cancel=True)
            raise
        finally:
            self._router.close(job.job_id)
            await leave_waiting(self._redis, self._keys, model, job_id)
        if isinstance(ev, Embeddings):
            if api_key is not None:
                await self.count_tokens(api_key, ev.prompt_tokens)
            return ev
        if isinstance(ev, Error):
            raise error_from_event(ev)
        raise APIError(500, f"The worker answered an embedding job with {ev.type}.", type="server_error")

    async def enter_queue(self, model: str, job_id: str) -> None:
        """The queue bound: counted atomically in Redis, across API processes."""
        bound = self.settings.max_queue_depth
        admitted = await admit(self._redis, self._keys, model, job_id, bound, self.settings.first_event_timeout_s)
        if admitted < 0:
            raise queue_full(model, -admitted, self.settings.retry_after_s)

    async def admit(self, model: str, kind: str) -> str:
        """The model's queue, if a live worker serves it as ``kind``."""
        live = (await self._registry.live_models()).get(model)
        if live is None:
            raise no_live_worker(model) if await self._registry.ever_served(model) else model_not_found(model)
        if live.info.kind != kind:
            raise wrong_model_kind(model, live.info.kind)
        return queue_name(model)

    async def _send(self, job: Job, queue: str) -> None:
        # On asyncio's own executor, whose threads live as long as the
        # process: Celery builds its result backend once per thread that
        # sends (scanning every installed package's entry points, ~6 ms),
        # and the threadpool Starlette offers ends threads idle for 10 s.
        await asyncio.to_thread(send_job, self._celery, job, queue)

    async def release(self, job_id: str, *, cancel: bool) -> None:
        self._router.close(job_id)
        if cancel:
            log.info("job %s: client gone before the end, cancelling", job_id)
            await request_cancel(self._redis, self._keys, job_id, self.settings.cancel_ttl_s)
