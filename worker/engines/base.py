"""What every engine shares.

The worker side that pulls jobs, claims them, publishes ``Started`` and
beats the heart (``worker/runtime.py``) does not know which engine runs a
job. It asks the engine for the job's choices and waits for them to end.
An engine turns each step of its work into ``Update`` records (new text,
token count, logprobs, finish, or an error, per choice), and hands them to
its ``Emitter``, which numbers, builds and publishes the events of a whole
step in one Redis pipeline, and keeps the choices that are still live.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from broker.schemas import Delta, Done, Error, FinishReason, Job, Timings, TokenLogprob, ToolCallDelta, Usage
from worker.publish import Publisher
from worker.toolcalls import ToolCallParser, ToolFormat

log = logging.getLogger("llmq.worker.engines")

THROUGHPUT_WINDOW_S = 10.0


class Refused(Exception):
    """A job this engine cannot run as asked: a 400 naming the parameter."""

    def __init__(self, message: str, param: str | None, code: str = "unsupported_parameter") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(eq=False)
class Choice:
    """One choice of one job, from submit to its last event."""

    job: Job
    index: int
    prompt_ids: list[int]
    max_tokens: int
    queue_s: float
    submitted: float = field(default_factory=time.monotonic)
    tokens: int = 0  # published so far
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    tool_parser: ToolCallParser | None = None  # set by the Emitter when the job may call tools

    @property
    def request_id(self) -> str:
        return f"{self.job.job_id}/{self.index}"


def choices_of(job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
    """A job's ``n`` choices, for engines that need no state of their own per choice."""
    return [Choice(job=job, index=i, prompt_ids=prompt_ids, max_tokens=max_tokens, queue_s=queue_s)
            for i in range(job.n)]


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


@dataclass(frozen=True, slots=True)
class Update:
    """What one step did for one choice. ``text`` is final: stop strings
    applied, nothing held back that a later step could take back."""

    choice: Choice
    text: str = ""
    tokens: int = 0  # new tokens
    logprobs: list[TokenLogprob] | None = None
    finish: FinishReason | None = None
    error: str | None = None


class Engine(Protocol):
    """One loaded model behind one engine; the runtime's only view of it."""

    kind: str  # "transformers", "vllm", "llama.cpp"
    names: tuple[str, ...]  # served names
    context_length: int
    vocab_size: int
    tokenizer: Any  # a Hugging Face tokenizer: chat template, encode, decode
    device: str
    tool_format: ToolFormat  # how this model writes tool calls (worker/toolcalls.py)
    emitter: Emitter

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop; choices still live end with an error event."""

    def check(self, job: Job) -> None:
        """Raise ``Refused`` for a request option this engine cannot honour
        (or a grammar it cannot build)."""

    def submit(self, job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
        """Start the job's choices; each one's ``ended`` is set after its last event."""

    def cancel(self, job_id: str) -> bool:
        """Stop the job's choices at the next step; True if any was live."""

    def healthy(self) -> bool: ...

    def step_s(self) -> float: ...


class Sequencer:
    """Event numbers per job, shared by its choices (0 was Started)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def next(self, job_id: str) -> int:
        n = self._next.get(job_id, 1)
        self._next[job_id] = n + 1
        return n

    def forget(self, job_id: str) -> None:
        self._next.pop(job_id, None)


class Emitter:
    """The live choices of one engine and the events they produce.

    ``cancel`` is the engine's own cancel, called when nobody listens on a
    job's reply channel any more (its API process is gone). Choices of jobs
    that may call tools get a parser of ``tools``: their text becomes
    content and tool-call pieces here, whatever the engine."""

    def __init__(self, publisher: Publisher, cancel: Callable[[str], object], tools: ToolFormat) -> None:
        self._publisher = publisher
        self._cancel = cancel
        self._tools = tools
        self._lock = threading.Lock()
        self._live: dict[str, Choice] = {}  # request id -> choice
        self._seq = Sequencer()
        self._recent: deque[tuple[float, int]] = deque()

    # ----------------------------------------------------------- bookkeeping

    def add(self, choices: Sequence[Choice]) -> None:
        for c in choices:
            if c.job.tools and c.job.tool_choice != "none":
                c.tool_parser = self._tools.parser()
        with self._lock:
            self._live.update((c.request_id, c) for c in choices)

    def of_job(self, job_id: str) -> list[Choice]:
        with self._lock:
            return [c for c in self._live.values() if c.job.job_id == job_id]

    def live(self) -> list[Choice]:
        with self._lock:
            return list(self._live.values())

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._live)

    def running_for(self, name: str) -> int:
        with self._lock:
            return sum(1 for c in self._live.values() if c.job.model == name)

    def next_seq(self, job_id: str) -> int:
        with self._lock:
            return self._seq.next(job_id)

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def drop_unheard(self, job_ids: Iterable[str]) -> None:
        """Cancel this emitter's jobs among ``job_ids``: no API process
        listened on the reply channel of their earlier events (read back
        late, see ``Publisher.send``), so nobody will read them."""
        for job_id in job_ids:
            if self.of_job(job_id):
                log.warning("job %s: its reply channel has no subscriber, cancelling", job_id)
                self._cancel(job_id)

    def end(self, choice: Choice, reason: FinishReason) -> None:
        """The choice is over: no event of it follows; its waiter wakes."""
        with self._lock:
            self._live.pop(choice.request_id, None)
            if not any(c.job.job_id == choice.job.job_id for c in self._live.values()):
                self._seq.forget(choice.job.job_id)
        if choice.finish_reason is None:
            choice.finish_reason = reason
        choice.ended.set()

    # ---------------------------------------------------------------- events

    def publish(self, updates: Sequence[Update]) -> None:
        """One step's updates as events, in one write to Redis."""
        now = time.monotonic()
        batch: list[tuple[Choice, Delta | Done | Error]] = []
        finished: list[Choice] = []
        new_tokens = 0
        for u in updates:
            c = u.choice
            if c.finish_reason is not None:  # cancelled or ended; a step may still have been in flight
                continue
            if u.error is not None:
                log.error("job %s: engine error: %s", c.job.job_id, u.error)
                batch.append((c, Error(job_id=c.job.job_id, seq=self.next_seq(c.job.job_id), status=500,
                                       error_type="server_error", code="engine_error",
                                       message=f"The model failed while generating: {u.error}")))
                c.finish_reason = "cancelled"
                finished.append(c)
                continue
            if u.tokens:
                new_tokens += u.tokens
                c.tokens += u.tokens
                if c.first_token_at is None:
                    c.first_token_at = now
            text, calls, finish = self._split_calls(c, u) if c.tool_parser else (u.text, [], u.finish)
            if text or u.logprobs or calls:
                batch.append((c, Delta(job_id=c.job.job_id, seq=self.next_seq(c.job.job_id), index=c.index,
                                       text=text, completion_tokens=c.tokens, logprobs=u.logprobs,
                                       tool_calls=calls or None)))
            if finish is not None:
                c.finish_reason = finish
                batch.append((c, self._done(c, now)))
                finished.append(c)
        with self._lock:
            self._recent.append((now, new_tokens))
        try:
            self.drop_unheard(self._publisher.send([(c.job.reply_channel, ev) for c, ev in batch]))
        finally:
            # Even when Redis is gone (its API process has failed these jobs
            # already): a choice that never ends holds its Celery thread forever.
            for c in finished:
                self.end(c, c.finish_reason or "stop")

    @staticmethod
    def _split_calls(c: Choice, u: Update) -> tuple[str, list[ToolCallDelta], FinishReason | None]:
        """The update's text as content and tool-call pieces; a choice that
        stopped after calling tools finishes with ``tool_calls``."""
        assert c.tool_parser is not None
        text, calls = c.tool_parser.feed(u.text)
        finish = u.finish
        if finish is not None:
            more, more_calls = c.tool_parser.flush()
            text, calls = text + more, calls + more_calls
            if finish == "stop" and c.tool_parser.calls:
                finish = "tool_calls"
        return text, calls, finish

    def fail_all(self, status: int, code: str, message: str) -> int:
        """End every live choice with an error event (engine stopped or died)."""
        choices = self.live()
        if not choices:
            return 0
        events = [(c.job.reply_channel, Error(job_id=c.job.job_id, seq=self.next_seq(c.job.job_id), status=status,
                                              error_type="server_error", code=code, message=message))
                  for c in choices]
        try:
            self._publisher.publish(events)
        except Exception:
            log.exception("could not tell %d job(s) that the engine stopped", len(choices))
        for c in choices:
            self.end(c, "cancelled")
        return len(choices)

    def _done(self, c: Choice, now: float) -> Done:
        first = None if c.first_token_at is None else c.first_token_at - c.submitted
        return Done(job_id=c.job.job_id, seq=self.next_seq(c.job.job_id), index=c.index, finish_reason=c.finish_reason or "stop",
                    usage=Usage(prompt_tokens=len(c.prompt_ids), completion_tokens=c.tokens),
                    timings=Timings(queue_s=c.queue_s, first_token_s=first, total_s=now - c.submitted))


T = TypeVar("T")


class Pump(Generic[T]):
    """A thread that hands everything queued since its last round to
    ``handle`` at once: outputs of steps that piled up go out together."""

    def __init__(self, name: str, handle: Callable[[list[T]], None]) -> None:
        self._handle = handle
        self._queue: queue.Queue[list[T]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.busy_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def put(self, items: list[T]) -> None:
        self._queue.put(items)

    def stop(self) -> None:
        """Handle what is queued, then end. No thread of ours may outlive
        stop(): a daemon thread still in native code when the interpreter
        finalizes aborts the process."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            try:
                items = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            while True:
                try:
                    items.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            t = time.monotonic()
            try:
                self._handle(items)
            except Exception:  # one bad batch must not kill the pump
                log.exception("publishing %d outputs failed", len(items))
            self.busy_s += time.monotonic() - t


class LoopBatcher:
    """Updates made on an asyncio loop (the vLLM and llama.cpp engines),
    published from that loop: what arrived in one wake-up goes out in one
    pipeline, and no token pays a hand-off to another thread. (A pump
    thread cost this worker a third of its CPU per token, waking the thread
    and passing the GIL back and forth.)

    With ``sources``, the updates of one engine step are gathered even when
    they arrive over several wake-ups, as llama-server's do (each slot's
    stream is written by its own HTTP thread, after the step; at 16 clients
    a step's updates came over 2.4 ms at the median, 5.3 ms at p90, with
    ~45 ms between steps): a batch goes out once every source that is
    streaming has put an update since the last one, or when none came for
    ``QUIET_S``, or ``GATHER_S`` after its first update. Updates that follow
    a complete step (a new stream's first token, a last message) wait only
    for the quiet. One Redis message a step, not one per wake-up (7.6 a
    step at 16 clients), spares Redis and the API their wake-ups."""

    QUIET_S = 0.001
    GATHER_S = 0.005

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Callable[[list[Update]], None],
                 alone: Callable[[], bool] | None = None, sources: Callable[[], int] | None = None) -> None:
        self._loop = loop
        self._publish = publish
        self._alone = alone  # True while one source puts: nothing could join its updates
        self._sources = sources  # how many sources put an update each step
        self._pending: list[Update] = []
        self._from: set[int] = set()  # ids of the choices with updates pending
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None
        self._first_at = self._last_at = 0.0  # loop time of the pending batch's first and latest update

    def put(self, updates: list[Update]) -> None:
        """Loop thread only."""
        if self._scheduled is None and self._alone is not None and self._alone():
            self._pending = updates  # out now, without a turn of the loop to wait for company
            self._flush()
            return
        self._pending.extend(updates)
        if self._sources is None:
            if self._scheduled is None:
                self._scheduled = self._loop.call_soon(self._flush)
            return
        self._from.update(id(u.choice) for u in updates)
        self._last_at = self._loop.time()
        if len(self._from) >= self._sources():
            if self._scheduled is not None:
                self._scheduled.cancel()
            self._flush()
        elif self._scheduled is None:
            self._first_at = self._last_at
            self._scheduled = self._loop.call_at(self._last_at + self.QUIET_S, self._expire)

    def _expire(self) -> None:
        due = min(self._last_at + self.QUIET_S, self._first_at + self.GATHER_S)
        if self._loop.time() < due:  # more came meanwhile: wait for the quiet, up to GATHER_S in all
            self._scheduled = self._loop.call_at(due, self._expire)
        else:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], None
        self._from.clear()
        try:
            self._publish(batch)
        except Exception:  # one bad batch must not stop the loop
            log.exception("publishing %d outputs failed", len(batch))
