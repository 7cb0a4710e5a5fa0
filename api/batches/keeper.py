"""The keeper: what moves a batch through its life, in every API process.

Each API process runs one keeper. Every ``LLMQ_BATCH_TICK_S`` (and at once
when a batch is created or cancelled) it reads the open batches from Redis,
sets the batch gauges, and takes a lease on each batch that has something to
do, so that one process at a time advances it:

    validating   copy and parse the input file: a structural problem fails
                 the batch (``errors`` name the lines); else in_progress
    in_progress  walk the lines in chunks: record a refused line's error at
                 once, send the others to the model's batch queue; save the
                 position after each chunk (a keeper taking over resumes
                 there). All lines done: finalizing; past expires_at: too
    finalizing   (completed or expired) and cancelling (after every line
                 ended or the grace ran out): mark each line that never ran
                 as skipped, write the output and error files under ids
                 chosen once, then the final status

Nothing lives only here: a keeper that dies leaves its lease to expire and
the next one redoes the step it was in, which every step allows (a line
sent twice is stored once; result files are overwritten, not duplicated).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from redis.exceptions import RedisError

from api.batches.files import BATCH_OUTPUT, FileStore, new_file_id
from api.batches.lines import InputLine, job_id, jobs_or_refusals, model_names, parse, render_all
from api.batches.store import Batch, BatchError, BatchErrors, BatchState, BatchStore, RequestCounts
from api.errors import APIError
from api.jobs.lifecycle import Jobs
from api.jobs.ticking import tick_forever
from api.metrics import Metrics
from broker.batches import CANCELLED, CANCELLING, COMPLETED, EXPIRED, FAILED, FINAL, FINALIZING, IN_PROGRESS, VALIDATING
from broker.schemas import Job, LineResult

log = logging.getLogger("llmq.api.batches.routes")

CHUNK = 500  # lines per step: sent or rendered between two saves of the position and Redis round trips
OPEN_STATUSES = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)


class BatchKeeper:
    """Built once per API process (``app.state.batch_keeper``); ``start`` and ``stop`` in the lifespan."""

    def __init__(self, store: BatchStore, files: FileStore, jobs: Jobs, metrics: Metrics, instance: str) -> None:
        self._store = store
        self._files = files
        self._jobs = jobs
        self._settings = settings = jobs.settings
        self._metrics = metrics
        self._instance = instance
        self._lease_ms = int(settings.batch_lease_s * 1000)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._working: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"BatchKeeper(instance={self._instance!r}, working={sorted(self._working)})"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batch-keeper")

    async def stop(self) -> None:
        """Stops ticking and any step under way; leases are released, so another process carries on at once."""
        tasks = [t for t in (self._task, *self._working.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def kick(self) -> None:
        """Look at the open batches now rather than at the next tick."""
        self._wake.set()

    # -- ticking

    async def _run(self) -> None:
        await tick_forever(self._tick, self._wake, self._settings.batch_tick_s, log, "batch keeper", "batches")

    async def _tick(self) -> None:
        ids = await self._store.open_ids()
        states = await self._store.states(ids) if ids else []
        self._observe(states)
        now = time.time()
        for batch_id, state in zip(ids, states):
            if state is None or state.batch.status in FINAL:
                await self._store.close(batch_id)  # expired, or its keeper died right after the final write
                continue
            if batch_id in self._working or not self._due(state, now):
                continue
            if await self._store.take_lease(batch_id, self._instance, self._lease_ms):
                self._working[batch_id] = asyncio.create_task(self._work(batch_id), name=f"batch {batch_id}")

    def _due(self, state: BatchState, now: float) -> bool:
        """Whether the batch has a step to take (else no lease is taken for it)."""
        b, total = state.batch, state.batch.request_counts.total
        if b.status == IN_PROGRESS:
            return state.enqueued < total or state.done >= total or now >= b.expires_at
        if b.status == CANCELLING:
            return state.done >= total or now >= (b.cancelling_at or 0) + self._settings.batch_cancel_grace_s
        return b.status in (VALIDATING, FINALIZING)

    def _observe(self, states: Iterable[BatchState | None]) -> None:
        statuses = dict.fromkeys(OPEN_STATUSES, 0)
        lines = {"queued": 0, "completed": 0, "failed": 0}
        for s in states:
            if s is None or s.batch.status not in statuses:
                continue
            statuses[s.batch.status] += 1
            counts = s.batch.request_counts
            lines["queued"] += max(counts.total - s.done, 0)
            lines["completed"] += counts.completed
            lines["failed"] += counts.failed
        self._metrics.observe_batches(statuses, lines)

    # -- one batch, under its lease

    async def _work(self, batch_id: str) -> None:
        me = asyncio.current_task()
        assert me is not None
        lost = asyncio.Event()
        renewer = asyncio.create_task(self._renew(batch_id, me, lost))
        try:
            await self._advance(batch_id)
        except asyncio.CancelledError:
            if not lost.is_set():
                raise
            me.uncancel()
            log.warning("batch %s: this API process lost its lease (not renewed within LLMQ_BATCH_LEASE_S=%s s: "
                        "Redis slow or this process starved); another process carries the batch on",
                        batch_id, self._settings.batch_lease_s)
        except (RedisError, OSError) as exc:
            log.warning("batch %s: Redis unreachable (%s); the next tick retries", batch_id, exc)
        except Exception:
            log.exception("batch %s: a step failed; the next tick retries it", batch_id)
        finally:
            renewer.cancel()
            self._working.pop(batch_id, None)
            try:
                await asyncio.shield(self._store.release_lease(batch_id, self._instance))
            except (RedisError, OSError):
                pass  # it expires by itself

    async def _renew(self, batch_id: str, work: asyncio.Task[None], lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self._settings.batch_lease_s / 3)
            try:
                held = await self._store.renew_lease(batch_id, self._instance, self._lease_ms)
            except (RedisError, OSError):
                continue  # the step itself fails on Redis, or the lease runs out
            if not held:
                lost.set()
                work.cancel()
                return

    async def _advance(self, batch_id: str) -> None:
        """Take steps until the batch waits on workers or is final."""
        lines: list[InputLine] | None = None  # parsed once per hold of the lease
        while True:
            state = await self._store.state(batch_id)
            if state is None:
                return
            b, now = state.batch, time.time()
            if b.status in FINAL:
                await self._store.close(batch_id)
                return
            if b.status == VALIDATING:
                lines = await self._validate(b)
            elif b.status == IN_PROGRESS:
                await self._store.keep_until(b)
                if now >= b.expires_at:
                    await self._to_finalizing(b, EXPIRED)
                elif state.enqueued < b.request_counts.total:
                    lines = lines or await self._lines(b)
                    await self._enqueue(b, state.enqueued, lines)
                elif state.done >= b.request_counts.total:
                    await self._to_finalizing(b, COMPLETED)
                else:
                    return
            elif b.status == FINALIZING:
                lines = lines or await self._lines(b)
                await self._finalize(b, state.finalize_as or COMPLETED, lines)
            elif b.status == CANCELLING and self._due(state, now):
                lines = lines or await self._lines(b)
                await self._finalize(b, CANCELLED, lines)
            else:
                return

    async def _lines(self, b: Batch) -> list[InputLine]:
        if b.request_counts.total == 0:
            return []  # cancelled before its lines were counted
        content = await self._store.input_copy(b.id)
        if content is None:
            raise RuntimeError(f"batch {b.id} is {b.status} but its copy of the input file is gone from Redis")
        # Validated once: the limit then in force holds, whatever LLMQ_BATCH_MAX_LINES says now.
        lines, problems = await asyncio.to_thread(parse, content, b.endpoint, b.request_counts.total)
        if problems or len(lines) != b.request_counts.total:
            raise RuntimeError(f"batch {b.id}: its input copy no longer parses to its {b.request_counts.total} lines "
                               f"({len(lines)} lines, {len(problems)} problems)")
        return lines

    async def _validate(self, b: Batch) -> list[InputLine] | None:
        content = await self._store.input_copy(b.id)
        if content is None:
            try:
                content = await self._files.content(b.input_file_id)
            except APIError:
                await self._fail(b, [BatchError(code="file_not_found", param="input_file_id", message=(
                    f"The input file {b.input_file_id} was deleted before the batch read it."))])
                return None
            await self._store.save_input(b.id, content)  # the batch keeps its own copy while open
        lines, problems = await asyncio.to_thread(parse, content, b.endpoint, self._settings.batch_max_lines)
        if problems:
            await self._fail(b, problems)
            return None
        started = b.model_copy(update={"status": IN_PROGRESS, "in_progress_at": int(time.time())})
        if not await self._store.transition(started, [VALIDATING], total=len(lines)):
            return None  # cancelled meanwhile: it ends with no line run
        log.info("batch %s: %d requests for %s, in progress", b.id, len(lines), b.endpoint)
        return lines

    async def _fail(self, b: Batch, problems: list[BatchError]) -> None:
        failed = b.model_copy(update={"status": FAILED, "failed_at": int(time.time()),
                                      "errors": BatchErrors(data=problems)})
        if await self._store.transition(failed, [VALIDATING]):
            await self._store.close(b.id)
            first = problems[0]
            log.info("batch %s failed validation (%d problems; the first, line %s: %s)", b.id, len(problems), first.line or "-",
                     first.message)

    async def _enqueue(self, b: Batch, position: int, lines: list[InputLine]) -> None:
        models = await self._jobs.registry.last_announced(model_names(lines[position:]))
        sent = refused = 0
        while position < len(lines):
            if await self._store.status(b.id) != IN_PROGRESS:
                return  # cancelled: the lines not sent are recorded as such when it is finalized
            chunk, now = lines[position:position + CHUNK], time.time()
            prepared = await asyncio.to_thread(jobs_or_refusals, b, chunk, models, self._settings, now)
            refusals = [p for p in prepared if isinstance(p, LineResult)]
            jobs = [p for p in prepared if isinstance(p, Job)]
            if refusals:
                await self._store.record(b.id, refusals)
            if jobs:
                await asyncio.to_thread(self._jobs.send_now, jobs)
            position += len(chunk)
            sent, refused = sent + len(jobs), refused + len(refusals)
            await self._store.set_enqueued(b.id, position)
        log.info("batch %s: %d lines sent to the batch queues, %d refused (in the error file)", b.id, sent, refused)

    async def _to_finalizing(self, b: Batch, outcome: str) -> None:
        finalizing = b.model_copy(update={"status": FINALIZING, "finalizing_at": int(time.time())})
        await self._store.transition(finalizing, [IN_PROGRESS], finalize_as=outcome)

    async def _finalize(self, b: Batch, outcome: str, lines: list[InputLine]) -> None:
        """Write the result files and the final status ``outcome``."""
        out_id, err_id = await self._store.result_file_ids(b.id, new_file_id(), new_file_id())
        skipped = "batch_cancelled" if outcome == CANCELLED else "batch_expired"
        out: list[str] = []
        err: list[str] = []
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start:start + CHUNK]
            results = await self._results(b, chunk, skipped)
            rendered = await asyncio.to_thread(render_all, b, chunk, results)
            for ok, text in rendered:
                (out if ok else err).append(text)
        await self._store.keep_until(b)  # the results hash included, now that every line has its result
        output_file = await self._write(b, out, out_id, "output")
        error_file = await self._write(b, err, err_id, "error")
        counts = RequestCounts(total=len(lines), completed=len(out), failed=len(err))
        final = b.model_copy(update={"status": outcome, f"{outcome}_at": int(time.time()),
                                     "output_file_id": output_file, "error_file_id": error_file,
                                     "request_counts": counts})
        if await self._store.transition(final, [b.status], total=counts.total, completed=counts.completed,
                                        failed=counts.failed):
            await self._store.close(b.id)
            log.info("batch %s %s: %d of %d requests completed, %d failed; output %s, errors %s", b.id, outcome,
                     counts.completed, counts.total, counts.failed, output_file, error_file)

    async def _results(self, b: Batch, chunk: list[InputLine], skipped: str) -> list[LineResult]:
        """Each line's result; a line with none never ran, and is stored as
        skipped first, so a worker that ends it later stores and counts nothing."""
        indices = [line.index for line in chunk]
        results = await self._store.results(b.id, indices)
        if all(r is not None for r in results):
            return results  # type: ignore[return-value]
        now = time.time()
        unrun = {line.index: LineResult(index=line.index, custom_id=line.custom_id, job_id=job_id(b, line.index),
                                        skipped=skipped, finished_at=now)  # type: ignore[arg-type]
                 for line, r in zip(chunk, results) if r is None}
        await self._store.record(b.id, list(unrun.values()))
        results = await self._store.results(b.id, indices)  # a worker may have stored one first
        return [r or unrun[i] for i, r in zip(indices, results)]

    async def _write(self, b: Batch, lines: list[str], file_id: str, kind: str) -> str | None:
        if not lines:
            return None
        content = ("\n".join(lines) + "\n").encode()
        await self._files.put(content, f"{b.id}_{kind}.jsonl", BATCH_OUTPUT, file_id=file_id)
        return file_id
