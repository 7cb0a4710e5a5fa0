"""The ``Emitter``: the live choices of one engine and the events they
produce. An engine hands it each step's ``Update`` records; it numbers,
builds and publishes the events of the whole step in one Redis pipeline
(``worker/publish.py``) and keeps the choices that are still live.

A job nobody listens to any more is not the emitter's business: the
publisher names it to the one handler the runtime registers over every
engine (``Runtime.cancel_unheard``), whichever engine runs it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker.schemas import Delta, Done, Error, FinishReason, Timings, TokenLogprob, ToolCallDelta, Usage
from worker.engines.protocol import Choice, Update
from worker.publish import Publisher
from worker.toolcalls import ToolFormat

log = logging.getLogger("llmq.worker.engines")

THROUGHPUT_WINDOW_S = 10.0


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


@dataclass
class Held:
    """What a choice generated since its last Delta went out (``--stream-interval``)."""

    sent_tokens: int = 0
    text: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    def add(self, text: str, calls: list[ToolCallDelta], logprobs: list[TokenLogprob] | None) -> None:
        self.text += text
        self.calls += calls
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs

    def take(self, tokens: int) -> tuple[str, list[ToolCallDelta], list[TokenLogprob] | None]:
        out = self.text, self.calls, self.logprobs
        self.sent_tokens, self.text, self.calls, self.logprobs = tokens, "", [], None
        return out


class Emitter:
    """The live choices of one engine and the events they produce.

    Choices of jobs that may call tools get a parser of ``tools``: their
    text becomes content and tool-call pieces here, whatever the engine.

    ``stream_interval`` (the worker's ``--stream-interval``, as FastChat's
    model worker has it): a choice's first tokens go out at once, then a
    Delta every ``stream_interval`` tokens and at its end, so a stream of
    many tokens a second costs Redis, the API and the client fewer
    messages."""

    def __init__(self, publisher: Publisher, tools: ToolFormat, stream_interval: int = 1) -> None:
        self._publisher = publisher
        self._tools = tools
        self.stream_interval = max(1, stream_interval)
        self._held: dict[str, Held] = {}  # request id -> what waits for the interval
        self._lock = threading.Lock()
        self._live: dict[str, Choice] = {}  # request id -> choice
        self._seq = Sequencer()
        self._recent: deque[tuple[float, int]] = deque()
        self._finished: deque[float] = deque()  # when each job ended (monotonic): the drain rate

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

    def jobs_per_s(self) -> float:
        """Jobs ended per second over the last window: what the API's
        ``Retry-After`` divides a queue's depth by."""
        now = time.monotonic()
        with self._lock:
            while self._finished and now - self._finished[0] > THROUGHPUT_WINDOW_S:
                self._finished.popleft()
            return len(self._finished) / THROUGHPUT_WINDOW_S

    def end(self, choice: Choice, reason: FinishReason) -> None:
        """The choice is over: no event of it follows; its waiter wakes."""
        with self._lock:
            self._live.pop(choice.request_id, None)
            self._held.pop(choice.request_id, None)
            if not any(c.job.job_id == choice.job.job_id for c in self._live.values()):
                self._seq.forget(choice.job.job_id)
                self._finished.append(time.monotonic())
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
            logprobs = u.logprobs
            if self.stream_interval > 1:
                with self._lock:  # end() may drop it from another thread: never kept for an ended choice
                    held = self._held.setdefault(c.request_id, Held()) if c.request_id in self._live else Held()
                held.add(text, calls, logprobs)
                if finish is None and held.sent_tokens and c.tokens - held.sent_tokens < self.stream_interval:
                    continue
                text, calls, logprobs = held.take(c.tokens)
            if text or logprobs or calls:
                batch.append((c, Delta(job_id=c.job.job_id, seq=self.next_seq(c.job.job_id), index=c.index,
                                       text=text, completion_tokens=c.tokens, logprobs=logprobs,
                                       tool_calls=calls or None)))
            if finish is not None:
                c.finish_reason = finish
                batch.append((c, self._done(c, now)))
                finished.append(c)
        with self._lock:
            self._recent.append((now, new_tokens))
        try:
            self._publisher.send([(c.job.reply_channel, ev) for c, ev in batch])
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
