"""Interactive jobs: chat and text completions and embeddings, whose request
waits in this API process. Their events come over the process's reply
channel (``api/jobs/replies.py``) into one mailbox per job; ``RunningJob``
follows it, judging the job by the lifecycle's one rule
(``api/jobs/lifecycle.py``) on a timer while no event comes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from api.errors import APIError, error_from_event
from api.jobs.lifecycle import Jobs, not_started, watch
from api.jobs.replies import AnyEvent, Mailbox, ReplyRouter, Ticker, next_event
from api.keys import NamedKey
from api.metrics import JobFigures, Metrics
from broker.control import MAX_QUEUE_TIME_EXCEEDED
from broker.schemas import AdapterChecked, Delta, Done, Embeddings, Error, Job, Started, TokenCount

log = logging.getLogger("llmq.api.jobs")


class Restarted:
    """Yielded by ``RunningJob.events`` when the job was resubmitted."""


@dataclass
class RunningJob:
    """A job whose worker has started it. Iterate ``events()`` to follow it."""

    job: Job
    started: Started
    _queue: Mailbox
    _jobs: Interactive
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
    _held: AnyEvent | None = None  # taken from the mailbox while coalescing, not yet yielded

    def __post_init__(self) -> None:
        self._open_choices = set(range(self.job.n))
        self.public_id = self.public_id or self.job.job_id

    @property
    def metrics(self) -> Metrics:
        return self._jobs.jobs.metrics

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

        While no event comes, the job is judged by the lifecycle's rule
        every half heartbeat TTL: a job resubmitted after its worker died
        yields a ``Restarted`` marker that tells the caller to drop what it
        collected (with ``client_saw_tokens=False`` a resubmission may follow
        tokens that never left the API); any other verdict ends it with an
        Error. No client ever hangs."""
        settings = self._jobs.settings
        poll = min(settings.heartbeat_ttl_s / 2, settings.event_timeout_s)
        # Looked at on ticks of half the poll, so a verdict comes between
        # one and one and a half polls after the last event.
        silent_since = looked_at = time.monotonic()
        ticker = self._ticker = Ticker(self._queue, poll / 2)
        try:
            while not self.finished:
                if self._held is not None:
                    ev, self._held = self._held, None
                else:
                    ev = await self._queue.get()
                if ev is not None and ev.job_id != self.job.job_id:
                    continue  # a late event of an attempt given up on
                if isinstance(ev, Delta) and not self._queue.empty():
                    ev = self._coalesce(ev)
                if ev is None:
                    now = time.monotonic()
                    if now - looked_at < poll:
                        continue
                    looked_at = now
                    ev = await self._judge(now - silent_since, client_saw_tokens)
                    if ev is None:
                        continue
                    if isinstance(ev, Restarted):
                        silent_since = looked_at = time.monotonic()
                        yield ev
                        continue
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

    def _coalesce(self, first: Delta) -> Delta:
        """``first`` and the Deltas of the same choice already waiting behind
        it, as one: a client that reads slower than tokens arrive gets the
        text it is behind on in one chunk, not a backlog of tiny ones.
        Tool-call pieces are never merged (each names its call)."""
        parts = [first]
        while not self._queue.empty():
            ev = self._queue.get_nowait()
            if (isinstance(ev, Delta) and ev.job_id == first.job_id and ev.index == first.index
                    and not ev.tool_calls and not first.tool_calls):
                parts.append(ev)
                continue
            self._held = ev  # None (a tick) is dropped: the next one comes half a poll later
            break
        if len(parts) == 1:
            return first
        logprobs = None if first.logprobs is None else [lp for p in parts for lp in p.logprobs or []]
        return first.model_copy(update={"text": "".join(p.text for p in parts), "logprobs": logprobs,
                                        "completion_tokens": parts[-1].completion_tokens, "seq": parts[-1].seq})

    async def _judge(self, silent_s: float, client_saw_tokens: bool) -> Error | Restarted | None:
        live = await self._jobs.jobs.live_workers()
        worker = self.started.worker
        verdict = watch(self._jobs.settings, what="job", worker=worker, alive=live is None or worker in live,
                        tokens_out=bool(self._tokens) and client_saw_tokens, attempt=self.attempt, waited_s=0.0,
                        silent_s=silent_s)
        if verdict is None:
            return None
        if not verdict.resubmit:
            if verdict.code == "worker_lost":
                log.warning("job %s: worker %s died after %d tokens; ending the job", self.job_id, worker,
                            sum(self._tokens.values()))
            return self._error(verdict.status, verdict.code, verdict.message)
        self.attempt += 1
        log.warning("job %s: worker %s died before the client got a token; resubmitting (attempt %d)", self.job_id,
                    worker, self.attempt + 1)
        self._tokens.clear()
        self._open_choices = set(range(self.job.n))
        try:
            self.job, self.started = await self._jobs.resubmit(self.job, self._queue, self.attempt)
        except APIError as exc:
            return self._error(exc.status, exc.code or "resubmit_failed", exc.message)
        return Restarted()

    def _error(self, status: int, code: str, message: str) -> Error:
        return Error(job_id=self.job.job_id, seq=0, status=status, error_type="server_error", code=code,
                     message=message)

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
        self.metrics.observe_job(figures)
        key_name = self.api_key.name if self.api_key is not None else "-"
        if self.api_key is not None:
            await self._jobs.jobs.count_tokens(self.api_key, figures.prompt_tokens + figures.completion_tokens)
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


class Interactive:
    """The lifecycle for requests that wait here; built once at start-up
    (``app.state.interactive``)."""

    def __init__(self, jobs: Jobs, router: ReplyRouter) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self._router = router

    def __repr__(self) -> str:
        return f"Interactive(router={self._router!r})"

    async def submit(self, job: Job, *, api_key: NamedKey | None = None) -> RunningJob:
        """Admit and send ``job`` (its ``reply_channel`` is filled in here)
        and wait until a worker starts it. Cancelled meanwhile (its client
        hung up: ``api/jobs/hangup.py``), it cancels the job, which the
        worker then skips without generating."""
        accepted_at = time.monotonic()
        job = job.model_copy(update={"reply_channel": self._router.channel, "share": self.jobs.share(job, api_key)})
        q, first = await self._start(job)
        if isinstance(first, Started):
            return RunningJob(job=job, started=first, _queue=q, _jobs=self,
                              accepted_at=accepted_at, api_key=api_key)
        await self.release(job.job_id, cancel=False)
        raise self._unexpected(first)

    async def embed(self, job: Job, *, api_key: NamedKey | None = None) -> Embeddings:
        ev = await self._one_event(job.model_copy(update={"share": self.jobs.share(job, api_key)}))
        if isinstance(ev, Embeddings):
            if api_key is not None:
                await self.jobs.count_tokens(api_key, ev.prompt_tokens)
            return ev
        raise self._unexpected(ev)

    async def count(self, job: Job) -> TokenCount:
        """A count job's answer: the prompt's tokens and the model's context."""
        ev = await self._one_event(job)
        if isinstance(ev, TokenCount):
            return ev
        raise self._unexpected(ev)

    async def check_adapter(self, job: Job) -> AdapterChecked:
        """An adapter job's answer: a worker of the base read the adapter and it fits (``api/admin.py``)."""
        ev = await self._one_event(job)
        if isinstance(ev, AdapterChecked):
            return ev
        raise self._unexpected(ev)

    async def _one_event(self, job: Job) -> AnyEvent:
        """The one event that is the whole answer of an embedding, count or adapter job."""
        job = job.model_copy(update={"reply_channel": self._router.channel})
        try:
            _, ev = await self._start(job)
        finally:
            self._router.close(job.job_id)
        return ev

    async def _start(self, job: Job) -> tuple[Mailbox, AnyEvent]:
        """Admit, send, and wait for the job's first event. The worker's
        claim takes the job off the queue bound (``broker/control.py``), so
        only a job that fails here, or whose first event was made here (the
        reply channel lost), is taken off by the API."""
        has_worker = await self.jobs.admit(job.model, "embedding" if job.kind == "embedding" else "chat",
                                           job.job_id)
        claimed = False
        try:
            q = self._router.open(job.job_id)  # refused while the reply channel is lost (api/jobs/replies.py)
            await self.jobs.send(job)
            ev = await self._first_event(q, job, has_worker)
            if isinstance(ev, Error) and ev.code == MAX_QUEUE_TIME_EXCEEDED:  # the worker found it expired
                raise await self.jobs.expired(job)
            claimed = not isinstance(ev, Error)
            return q, ev
        except BaseException:
            await self.release(job.job_id, cancel=True)
            raise
        finally:
            if not claimed:
                await self.jobs.leave_queue(job.model, job.job_id)

    async def _first_event(self, q: Mailbox, job: Job, has_worker: bool = True) -> AnyEvent:
        """The first event of ``job`` (a shared mailbox may still hold an
        earlier attempt's). Still queued at its deadline, it is given up
        (429); a job admitted for a declared model with no live worker is
        given up if none came within ``wait_for_worker_s`` (503); a 504 if
        nothing came at all in ``first_event_timeout_s``. A job a worker
        claimed before either is waited for."""
        now = time.monotonic()
        give_up_at = now + self.settings.first_event_timeout_s
        deadline = job.queue_deadline()
        expire_at = None if deadline is None else now + deadline - time.time()
        worker_by = None if has_worker else now + self.settings.wait_for_worker_s
        while True:
            now = time.monotonic()
            due = min(t for t in (give_up_at, expire_at, worker_by) if t is not None)
            if due > now:
                ev = await next_event(q, due - now)
                if ev is not None and ev.job_id == job.job_id:
                    return ev
                continue
            error: APIError | None
            if expire_at is not None and now >= expire_at:
                expire_at, error = None, await self.jobs.give_up(job)
            elif worker_by is not None and now >= worker_by:
                worker_by = None
                live = job.model in await self.jobs.registry.live_models()
                error = None if live else await self.jobs.no_worker_came(job)
            else:
                raise not_started(self.settings, "job").error()
            if error is not None:
                raise error

    async def resubmit(self, job: Job, q: Mailbox, attempt: int) -> tuple[Job, Started]:
        """Send ``job`` again as its ``attempt``-th resubmission, its events into the same mailbox."""
        await self.release(job.job_id, cancel=True)  # in case the old worker was only slow
        again = self.jobs.next_attempt(job, attempt)
        self._router.attach(again.job_id, q)
        await self.jobs.send(again)
        ev = await self._first_event(q, again)
        if isinstance(ev, Started):
            return again, ev
        raise self._unexpected(ev)

    @staticmethod
    def _unexpected(ev: AnyEvent) -> APIError:
        if isinstance(ev, Error):
            return error_from_event(ev)
        return APIError(500, f"The worker's first event was {ev.type}, not what the job asked for.",
                        type="server_error")

    async def release(self, job_id: str, *, cancel: bool) -> None:
        self._router.close(job_id)
        if cancel:
            log.info("job %s: client gone before the end, cancelling", job_id)
            await self.jobs.cancel(job_id)


def new_job_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
