"""The skeleton of an engine that runs its requests as asyncio tasks on a
loop thread of its own (the vLLM and llama.cpp engines): submit, cancel,
the step clock, the ``LoopBatcher`` that publishes what each wake-up of the
loop produced, and the end of every live choice when the engine stops.

A subclass writes ``generate(request)``, the coroutine that runs one
request and puts its ``Update`` records with ``self.put``; an exception
from it becomes an error event of the request's choices. A job is one
request for all its choices (``PER_CHOICE = False``: the engine samples
``n`` itself, as vLLM does) or one request per choice (llama.cpp).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.schemas import Job
from worker.engines.batchers import LoopBatcher
from worker.engines.emitter import Emitter
from worker.engines.protocol import Choice, Update, choices_of
from worker.publish import Publisher
from worker.toolcalls import ToolFormat

log = logging.getLogger("llmq.worker.engines")

T = TypeVar("T")


class StepClock:
    """A running mean of the time between an engine's outputs while busy: the
    step time of an engine that does not report its own (vLLM, llama.cpp)."""

    def __init__(self) -> None:
        self.mean_s = 0.0
        self._last = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        gap, self._last = now - self._last, now
        if 0 < gap < 1.0:
            self.mean_s = 0.9 * self.mean_s + 0.1 * gap if self.mean_s else gap


@dataclass(frozen=True, eq=False)
class Request:
    """What one task of the loop runs: one job's choices, all or one."""

    id: str  # the job id, or with PER_CHOICE the choice's request id
    job: Job
    prompt_ids: list[int]
    max_tokens: int
    choices: list[Choice]


class LoopEngine:
    """The loop thread and the requests on it. ``sources``: how many requests
    put an update every engine step, for a batcher that gathers a step
    written over several wake-ups (``LoopBatcher``); None: each wake-up's
    updates go out together."""

    kind: str
    PER_CHOICE = False

    def __init__(self, names: tuple[str, ...], tool_format: ToolFormat, publisher: Publisher,
                 sources: Callable[[], int] | None = None, stream_interval: int = 1) -> None:
        self.names = names
        self.tool_format = tool_format
        self.emitter = Emitter(publisher, tool_format, stream_interval)
        self._stopping = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"llmq-{self.kind}-{names[0]}",
                                             daemon=True)
        self._loop_thread.start()
        self._tasks: dict[str, tuple[Request, asyncio.Task[None]]] = {}  # by request id (loop thread only)
        alone = (lambda: len(self._tasks) <= 1) if sources is not None else None
        self._out = LoopBatcher(self._loop, self.emitter.publish, alone=alone, sources=sources)
        self._clock = StepClock()

    async def generate(self, request: Request) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Loop thread only: the engine sent an output (``step_s``)."""
        self._clock.tick()

    def put(self, updates: list[Update]) -> None:
        """Loop thread only: updates to publish."""
        self._out.put(updates)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop, from another thread, and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        """Everything runs from the constructor on."""

    def stop(self) -> None:
        """End every live choice with an error event, shut the engine down
        (``shut_down``), then the loop."""
        self._stopping.set()
        n = self.emitter.fail_all(503, "worker_shutdown", "The worker running this job shut down before it finished.")
        if n:
            log.warning("stopped with %d running job(s); they ended with an error", n)
        try:
            self.shut_down()
        finally:
            self.close_loop()

    def shut_down(self) -> None:
        """The engine's own end, while its loop still runs."""

    def close_loop(self, timeout: float = 10) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=timeout)

    def step_s(self) -> float:
        return self._clock.mean_s

    def submit(self, job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
        choices = choices_of(job, prompt_ids, max_tokens, queue_s)
        self.emitter.add(choices)
        groups = [(c.request_id, [c]) for c in choices] if self.PER_CHOICE else [(job.job_id, choices)]
        for rid, group in groups:
            self._loop.call_soon_threadsafe(self._start, Request(rid, job, prompt_ids, max_tokens, group))
        return choices

    def cancel(self, job_id: str) -> bool:
        choices = self.emitter.of_job(job_id)
        for c in choices:
            self.emitter.end(c, "cancelled")
        if choices:
            self._loop.call_soon_threadsafe(self._abort, job_id)
            log.info("job %s: cancelled after %d tokens", job_id, sum(c.tokens for c in choices))
        return bool(choices)

    # --------------------------------------------------------- loop thread

    def _start(self, request: Request) -> None:
        if all(c.finish_reason is not None for c in request.choices):
            return  # cancelled before it reached the loop
        task = self._loop.create_task(self._run(request))
        self._tasks[request.id] = (request, task)
        task.add_done_callback(lambda _: self._tasks.pop(request.id, None))

    def _abort(self, job_id: str) -> None:
        for request, task in list(self._tasks.values()):
            if request.job.job_id == job_id:
                task.cancel()  # each engine's generate() ends its request when cancelled

    async def _run(self, request: Request) -> None:
        try:
            await self.generate(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._stopping.is_set():
                return  # the engine went away under it; its choices have ended already
            log.exception("job %s: the %s engine failed request %s", request.job.job_id, self.kind, request.id)
            self._out.put([Update(c, error=f"{type(exc).__name__}: {exc}") for c in request.choices])
