"""The keeper of responses, in every API process: what happens to a
response nobody's request is waiting on (a background one, or one whose API
process died).

Every ``TICK_S`` it reads the open responses (``Keys.responses_open``) and
the entries their streams gained since it last looked, folds them
(``api/responses/events.py``), and:

- a response that ended: its end is counted once (metrics, the API key's
  tokens, one log line), then it leaves the open set; a ``store: false`` one
  is deleted ``UNSTORED_LINGER_S`` later (whoever followed it has its end
  by then);
- a response whose job started and left the queue bound is taken off it;
- a response whose worker is gone (its heartbeat expired): resubmitted
  under a new job id if that worker sent no token yet, else failed
  (``worker_lost``); one no worker started in time, or whose live worker
  went silent, is failed too: the lifecycle's one rule
  (``api/jobs/lifecycle.py``, ``watch``) decides, as for a request that
  waits.

Several keepers may decide the same thing at once: each appends its mark
only if the stream's last entry is still the one its decision was taken on
(``ResponseStore.append``), so exactly one of them acts, and a mark never
lands after an entry its keeper did not see. That compare-and-append takes
the place of a lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from api.errors import APIError
from api.jobs.lifecycle import Jobs, watch
from api.jobs.ticking import tick_forever
from api.keys import NamedKey
from api.metrics import Metrics
from api.responses.events import Mark, ResponseFold
from api.responses.store import ResponseStore

log = logging.getLogger("llmq.api.responses.routes")

TICK_S = 1.0
UNSTORED_LINGER_S = 30.0


class ResponseKeeper:
    """Built once per API process (``app.state.response_keeper``); ``start`` and ``stop`` in the lifespan."""

    def __init__(self, store: ResponseStore, jobs: Jobs, metrics: Metrics,
                 count_tokens: Callable[[str, int], Awaitable[None]]) -> None:
        self._store = store
        self._jobs = jobs
        self._metrics = metrics
        self._count_tokens = count_tokens
        self._folds: dict[str, ResponseFold] = {}
        self._unqueued: set[str] = set()  # responses this keeper took off their model's queue bound
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"ResponseKeeper(watching={len(self._folds)})"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="response-keeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def kick(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        await tick_forever(self.tick, self._wake, TICK_S, log, "response keeper", "responses")

    async def tick(self) -> None:
        ids = await self._store.open_ids()
        for gone in set(self._folds) - set(ids):
            self._forget(gone)
        if not ids:
            return
        looks = await self._store.look(ids, {i: f.last_id for i, f in self._folds.items()})
        live = {w.worker_id for w in await self._jobs.registry.workers()}
        now_ms = int(time.time() * 1000)
        for response_id, (exists, has_record, entries) in zip(ids, looks):
            if not has_record:
                # Deleted (a tombstone) or expired: a late worker append may have recreated the stream.
                await self._store.delete_stream(response_id)
                if not exists:
                    await self._store.close(response_id)
                    self._forget(response_id)
                continue
            state = self._folds.get(response_id)
            if state is None:
                record = await self._store.get(response_id)
                if record is None:
                    continue
                state = self._folds[response_id] = ResponseFold(record)
                state.opening()
            for entry_id, fields in entries:
                state.feed(entry_id, fields)
            await self._look_after(state, live, now_ms)

    def _forget(self, response_id: str) -> None:
        self._folds.pop(response_id, None)
        self._unqueued.discard(response_id)

    async def _look_after(self, state: ResponseFold, live: set[str], now_ms: int) -> None:
        rid = state.record.id
        if (state.worker is not None or state.ended) and rid not in self._unqueued:
            await self._jobs.leave_queue(state.record.model, state.record.job.job_id)
            self._unqueued.add(rid)
        if state.ended:
            await self._ended(state, now_ms)
            return
        waited_s = (now_ms - state.job_since_ms) / 1000
        if state.worker is None:
            error = await self._queued_too_long(state, waited_s)
            if error is not None:
                await self._fail(state, error.status, error.code or "", error.message)
                return
        verdict = watch(self._jobs.settings, what="response", worker=state.worker, alive=state.worker in live,
                        tokens_out=state.had_delta, attempt=state.attempts, waited_s=waited_s,
                        silent_s=(now_ms - state.last_ms) / 1000)
        if verdict is None:
            return
        if verdict.resubmit:
            await self._resubmit(state)
        else:
            await self._fail(state, verdict.status, verdict.code, verdict.message)

    async def _queued_too_long(self, state: ResponseFold, waited_s: float) -> APIError | None:
        """A response still queued past its max queue time, or one for a
        declared model whose wait for a first worker is over, is given up as
        an interactive job is (``api/jobs/interactive.py``), unless a worker
        claimed it first."""
        job = state.record.job.model_copy(update={"job_id": state.job_id})
        settings = self._jobs.settings
        if job.max_queue_s is not None and waited_s > job.max_queue_s:
            return await self._jobs.give_up(job)
        if (0 < settings.wait_for_worker_s < waited_s and settings.declared(job.model) is not None
                and job.model not in await self._jobs.registry.live_models()):
            return await self._jobs.no_worker_came(job)
        return None

    async def _ended(self, state: ResponseFold, now_ms: int) -> None:
        record = state.record
        if await self._store.mark_ended(record.id, state.status):
            usage = state.usage() or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
            self._metrics.responses.labels(state.status).inc()
            self._metrics.prompt_tokens.labels(record.model).inc(usage["input_tokens"])
            self._metrics.generation_tokens.labels(record.model).inc(usage["output_tokens"])
            if record.api_key is not None:
                await self._count_tokens(record.api_key, usage["total_tokens"])
            took = ((state.ended_ms or now_ms) - record.created_at * 1000) / 1000
            code = state.error_code or "-"
            log.info("response %s job %s model=%s status=%s error=%s attempts=%d input_tokens=%d output_tokens=%d "
                     "total_s=%.3f", record.id, state.job_id, record.model, state.status, code, state.attempts + 1,
                     usage["input_tokens"], usage["output_tokens"], took,
                     extra={"response_id": record.id, "job_id": state.job_id, "model": record.model,
                            "status": state.status, "prompt_tokens": usage["input_tokens"],
                            "completion_tokens": usage["output_tokens"], "total_s": round(took, 4)})
        if record.store:
            await self._store.close(record.id)
            self._forget(record.id)
        elif state.ended_ms is not None and now_ms - state.ended_ms > UNSTORED_LINGER_S * 1000:
            await self._store.drop(record.id)
            self._forget(record.id)

    async def _resubmit(self, state: ResponseFold) -> None:
        record, dead = state.record, state.worker
        job = self._jobs.next_attempt(record.job, state.attempts + 1)
        new_id = job.job_id
        marked = await self._store.append(record.id, Mark(kind="resubmitted", job_id=new_id), if_last=state.last_id)
        if marked is None:
            return  # another keeper acted first, or the worker spoke meanwhile: the next tick looks again
        log.warning("response %s: worker %s died before the first token of job %s; resubmitting as %s", record.id,
                    dead, state.job_id, new_id, extra={"response_id": record.id, "job_id": new_id})
        await self._jobs.cancel(state.job_id)
        try:
            await self._jobs.send(job)
        except Exception as exc:  # the mark names a job nobody sent: end the response now, not at a timeout
            log.warning("response %s: could not resubmit (%s)", record.id, exc)
            await self._store.append(record.id, Mark(kind="failed", code="resubmit_failed", status=503, message=(
                f"The worker running this response stopped, and sending it again failed: {exc}")), if_last=marked)

    async def _fail(self, state: ResponseFold, status: int, code: str, message: str) -> None:
        record = state.record
        mark = Mark(kind="failed", code=code, message=message, status=status)
        if await self._store.append(record.id, mark, if_last=state.last_id) is None:
            return
        log.warning("response %s job %s failed (%s): %s", record.id, state.job_id, code, message,
                    extra={"response_id": record.id, "job_id": state.job_id})
        await self._jobs.cancel(state.job_id)


def token_counter(keys: list[NamedKey], count: Callable[[NamedKey, int], Awaitable[None]]
                  ) -> Callable[[str, int], Awaitable[None]]:
    """Counts tokens against the API key of that name, if it is still configured."""
    by_name = {k.name: k for k in keys}

    async def counted(name: str, tokens: int) -> None:
        key = by_name.get(name)
        if key is not None:
            await count(key, tokens)

    return counted
