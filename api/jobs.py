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
from starlette.concurrency import run_in_threadpool

from api.errors import APIError, model_not_found, no_live_worker, queue_full
from api.replies import AnyEvent, ReplyRouter, next_event
from broker.celery_app import GENERATE_TASK
from broker.control import request_cancel
from broker.keys import Keys, queue_name
from broker.registry import Registry
from broker.schemas import Delta, Done, Embeddings, Error, Job, Message, Sampling, Started
from broker.settings import Settings

log = logging.getLogger("llmq.api.jobs")


def error_from_event(ev: Error) -> APIError:
    return APIError(ev.status, ev.message, type=ev.error_type, code=ev.code, param=ev.param)


@dataclass
class RunningJob:
    """A job whose worker has started it. Iterate ``events()`` to follow it."""

    job: Job
    started: Started
    _queue: asyncio.Queue[AnyEvent]
    _jobs: "Jobs"
    finished: bool = False
    failed: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _open_choices: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._open_choices = set(range(self.job.n))

    @property
    def job_id(self) -> str:
        return self.job.job_id

    async def events(self, tick_s: float | None = None) -> AsyncIterator[Delta | Done | Error | None]:
        """Deltas and each choice's Done until all are done or an Error; with ``tick_s``, also None after each
        ``tick_s`` without an event, so the caller can look at its client.
        A worker silent for ``event_timeout_s`` ends the job with an Error,
        so no client ever hangs."""
        limit = self._jobs.settings.event_timeout_s
        silent_since = time.monotonic()
        while not self.finished:
            ev = await next_event(self._queue, min(tick_s or limit, limit))
            if ev is None:
                if time.monotonic() - silent_since < limit:
                    yield None
                    continue
                self.finished = self.failed = True
                yield Error(
                    job_id=self.job_id, seq=0, status=504, error_type="server_error", code="worker_timeout",
                    message=f"The worker sent nothing for {limit:.0f} s; the job was abandoned.",
                )
                return
            silent_since = time.monotonic()
            if isinstance(ev, Done):
                self._open_choices.discard(ev.index)
            if isinstance(ev, Error):
                self.failed = True
            if isinstance(ev, Error) or not self._open_choices:
                self.finished = True
            if isinstance(ev, Delta | Done | Error):
                yield ev

    async def close(self) -> None:
        """Always called: cancels the job on the worker unless it finished."""
        await self._jobs.release(self.job_id, cancel=not self.finished)


class Jobs:
    """Built once at start-up and kept on ``app.state``."""

    def __init__(
        self, settings: Settings, r: aioredis.Redis, keys: Keys, registry: Registry, router: ReplyRouter, celery: Celery
    ) -> None:
        self.settings = settings
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
        id_prefix: str,
    ) -> RunningJob:
        queue = await self._admit(model, "chat")
        job = Job(
            job_id=f"{id_prefix}-{uuid.uuid4().hex}",
            model=model,
            kind=kind,  # type: ignore[arg-type]
            messages=messages,
            prompt=prompt,
            sampling=sampling,
            n=n,
            stop=stop or [],
            echo=echo,
            reply_channel=self._router.channel,
            submitted_at=time.time(),
        )
        q = self._router.open(job.job_id)
        try:
            await run_in_threadpool(self._send, job, queue)
            first = await next_event(q, self.settings.first_event_timeout_s)
        except BaseException:
            await self.release(job.job_id, cancel=True)
            raise
        if isinstance(first, Started):
            return RunningJob(job=job, started=first, _queue=q, _jobs=self)
        await self.release(job.job_id, cancel=first is None)
        if isinstance(first, Error):
            raise error_from_event(first)
        if first is None:
            raise APIError(504, f"No worker started the job within {self.settings.first_event_timeout_s:.0f} s.",
                           type="server_error", code="queue_timeout")
        raise APIError(500, f"The worker's first event was {first.type}, not started.", type="server_error")

    async def embed(self, *, model: str, inputs: list[str] | list[list[int]]) -> Embeddings:
        queue = await self._admit(model, "embedding")
        job = Job(job_id=f"embd-{uuid.uuid4().hex}", model=model, kind="embedding", inputs=inputs,
                  reply_channel=self._router.channel, submitted_at=time.time())
        q = self._router.open(job.job_id)
        try:
            await run_in_threadpool(self._send, job, queue)
            ev = await next_event(q, self.settings.first_event_timeout_s)
        finally:
            self._router.close(job.job_id)
        if isinstance(ev, Embeddings):
            return ev
        if isinstance(ev, Error):
            raise error_from_event(ev)
        await request_cancel(self._redis, self._keys, job.job_id, self.settings.cancel_ttl_s)
        raise APIError(504, f"No worker embedded the input within {self.settings.first_event_timeout_s:.0f} s.",
                       type="server_error", code="queue_timeout")

    async def _admit(self, model: str, kind: str) -> str:
        """The model's queue, if a live worker serves it as ``kind`` and its queue has room."""
        live = (await self._registry.live_models()).get(model)
        if live is None:
            raise no_live_worker(model) if await self._registry.ever_served(model) else model_not_found(model)
        if live.info.kind != kind:
            route = "/v1/embeddings" if live.info.kind == "embedding" else "/v1/chat/completions or /v1/completions"
            raise APIError(400, f"The model '{model}' is a {live.info.kind} model; use {route}.", param="model",
                           code="wrong_model_kind")
        queue = queue_name(model)
        depth = int(await self._redis.llen(queue))
        if depth >= self.settings.max_queue_depth:
            raise queue_full(model, depth, self.settings.retry_after_s)
        return queue

    def _send(self, job: Job, queue: str) -> None:
        self._celery.send_task(
            GENERATE_TASK,
            kwargs={"job": job.model_dump(mode="json")},
            queue=queue,
            task_id=job.job_id,
            # Flower shows this instead of the arguments: never the prompt.
            argsrepr="()",
            kwargsrepr=json.dumps(job.summary()),
        )

    async def release(self, job_id: str, *, cancel: bool) -> None:
        self._router.close(job_id)
        if cancel:
            log.info("job %s: client gone before the end, cancelling", job_id)
            await request_cancel(self._redis, self._keys, job_id, self.settings.cancel_ttl_s)
