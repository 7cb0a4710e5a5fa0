"""The continuous-batching engine of one loaded model.

transformers' ``ContinuousBatchingManager`` runs the batch in its own thread:
requests join between steps and leave when they finish or are cancelled.
After each step it hands the outputs of every request that advanced to
``deliver_batch``; ``_StepRouter`` passes that list to our pump thread, which
detokenizes, applies stop strings, attaches logprobs and publishes one event
per choice, the whole step in one Redis pipeline. Token choice itself is
``worker/sampler.py``'s. Celery's worker threads only submit and wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationConfig
from transformers.generation import ContinuousBatchingConfig
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from broker.schemas import Delta, Done, Error, FinishReason, Job, Timings, TokenLogprob, Usage
from worker.detok import IncrementalDetokenizer
from worker.loading import LoadedModel
from worker.publish import Publisher
from worker.sampler import SLOT_KWARG, Pick, Sampler, Slot, install
from worker.stops import StopStrings

log = logging.getLogger("llmq.worker.engine")

PAGE_SIZE = 256
THROUGHPUT_WINDOW_S = 10.0
STEP_GAP_S = 2.0  # longer gaps between deliveries are idle time, not steps


@dataclass(eq=False)
class Run:
    """One choice of one job inside the engine."""

    job: Job
    index: int
    prompt_ids: list[int]
    max_tokens: int
    detok: IncrementalDetokenizer
    queue_s: float
    submitted: float = field(default_factory=time.monotonic)
    tokens: int = 0
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    stops: StopStrings = field(init=False)
    slot_id: int = -1
    slot: Slot | None = None

    def __post_init__(self) -> None:
        self.stops = StopStrings(self.job.stop)

    @property
    def request_id(self) -> str:
        return f"{self.job.job_id}/{self.index}"


class _StepRouter(OutputRouter):
    """Hands each engine step's outputs, as one list, to the pump thread."""

    def __init__(self, steps: queue.Queue[list[GenerationOutput]]) -> None:
        super().__init__()
        self._steps = steps
        self._last = 0.0
        self.step_times: deque[float] = deque(maxlen=32)

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        now = time.monotonic()
        if now - self._last < STEP_GAP_S:  # back-to-back steps: the gap is one step's time
            self.step_times.append(now - self._last)
        self._last = now
        self._steps.put(outputs)

    def deliver(self, output: GenerationOutput) -> None:
        self._steps.put([output])


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


class Engine:
    def __init__(self, lm: LoadedModel, publisher: Publisher, *, max_batch: int, kv_cache_tokens: int) -> None:
        self.lm = lm
        self._publisher = publisher
        self._runs: dict[str, Run] = {}  # request id -> run
        self._lock = threading.Lock()
        self._steps: queue.Queue[list[GenerationOutput]] = queue.Queue()
        self._recent: deque[tuple[float, int]] = deque()
        self._stopping = threading.Event()
        self._seq = Sequencer()
        self.sampler = Sampler(lm.vocab_size)

        gen_config = GenerationConfig(
            # Sampling is Sampler's; the engine only takes the token it marks.
            do_sample=True,
            temperature=0.7,
            max_new_tokens=lm.context_length,
            eos_token_id=lm.eos_token_ids,
            pad_token_id=lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0],
        )
        cb_config = ContinuousBatchingConfig(
            per_request_processors=True,
            max_requests_per_batch=max_batch,
            page_size=PAGE_SIZE,
            # Without a bound the cache takes most of the machine's memory on CPU.
            num_blocks=max(max_batch, -(-kv_cache_tokens // PAGE_SIZE)),
        )
        self._manager = lm.model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        install(self._manager, self.sampler)
        self._router = _StepRouter(self._steps)
        self._manager.output_router = self._router
        self._pump = threading.Thread(target=self._pump_loop, name=f"llmq-pump-{lm.names[0]}", daemon=True)

    def __repr__(self) -> str:
        return f"Engine(model={self.lm.names[0]!r}, running={self.running})"

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._manager.start()
        self._pump.start()

    def stop(self) -> None:
        """Stop the engine; jobs still running end with an error event."""
        self._stopping.set()
        self._manager.stop(block=True, timeout=10)
        with self._lock:
            runs = list(self._runs.values())
        if runs:
            log.warning("stopping with %d running job(s); they end with an error", len(runs))
            events = [(r.job.reply_channel, Error(
                job_id=r.job.job_id, seq=self._seq.next(r.job.job_id), status=503, error_type="server_error",
                code="worker_shutdown", message="The worker running this job shut down before it finished.",
            )) for r in runs]
            try:
                self._publisher.publish(events)
            except Exception:
                log.exception("could not tell %d job(s) that the worker stops", len(runs))
        for run in runs:
            self._end(run, "cancelled")

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._runs)

    def running_for(self, name: str) -> int:
        with self._lock:
            return sum(1 for r in self._runs.values() if r.job.model == name)

    def step_s(self) -> float:
        times = list(self._router.step_times)
        return sum(times) / len(times) if times else 0.0

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def next_seq(self, job_id: str) -> int:
        return self._seq.next(job_id)

    def submit(self, run: Run) -> None:
        s = run.job.sampling
        run.slot_id, run.slot = self.sampler.open(s, None if s.seed is None else s.seed + run.index)
        with self._lock:
            self._runs[run.request_id] = run
        self._manager.add_request(
            run.prompt_ids,
            request_id=run.request_id,
            max_new_tokens=run.max_tokens,
            streaming=True,
            **{SLOT_KWARG: run.slot_id},
        )

    def cancel(self, job_id: str) -> bool:
        """Free the job's batch slots at the next step. True if it was running."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.job.job_id == job_id]
        for run in runs:
            self._manager.cancel_request(run.request_id)
            # After cancel_request no final output arrives, so end the run here.
            self._end(run, "cancelled")
        if runs:
            log.info("job %s: cancelled after %d tokens", job_id, sum(r.tokens for r in runs))
        return bool(runs)

    def _end(self, run: Run, reason: FinishReason) -> None:
        with self._lock:
            self._runs.pop(run.request_id, None)
            if not any(r.job.job_id == run.job.job_id for r in self._runs.values()):
                self._seq.forget(run.job.job_id)
        self.sampler.close(run.slot_id)
        if run.finish_reason is None:
            run.finish_reason = reason
        run.ended.set()

    # --------------------------------------------------------------- pump

    def _pump_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                outputs = self._steps.get(timeout=0.5)
            except queue.Empty:
                continue
            # Outputs of steps that arrived meanwhile go out in the same pipeline.
            while True:
                try:
                    outputs.extend(self._steps.get_nowait())
                except queue.Empty:
                    break
            try:
                self._publish_step(outputs)
            except Exception:  # a publish failure must not kill the pump
                log.exception("publishing a step of %d outputs failed", len(outputs))

    def _publish_step(self, outputs: list[GenerationOutput]) -> None:
        now = time.monotonic()
        batch: list[tuple[Run, Delta | Done | Error]] = []
        finished: list[Run] = []
        new_tokens = 0
        with self._lock:
            latest = {o.request_id: o for o in outputs}  # several steps may have piled up
            pairs = [(self._runs.get(rid), o) for rid, o in latest.items()]
        for run, out in pairs:
            if run is None:  # cancelled; one chunk may still be in flight
                continue
            fresh = out.generated_tokens[run.tokens :]
            new_tokens += len(fresh)
            if fresh and run.first_token_at is None:
                run.first_token_at = now
            run.tokens = len(out.generated_tokens)
            if out.status == RequestStatus.FAILED:
                batch.append((run, self._error(run, out.error or "the engine failed this request")))
                finished.append(run)
                continue
            done = out.status == RequestStatus.FINISHED
            text, stopped = run.stops.feed(run.detok.push(fresh))
            if done and not stopped:
                more, stopped = run.stops.feed(run.detok.flush())
                text += more if stopped else more + run.stops.flush()
            picks = run.slot.take(len(fresh)) if run.slot is not None and run.slot.wants_logprobs else []
            if text or picks:
                batch.append((run, Delta(job_id=run.job.job_id, seq=self._seq.next(run.job.job_id), index=run.index,
                                         text=text, completion_tokens=run.tokens,
                                         logprobs=self._logprobs(picks) if picks else None)))
            if stopped and not done:
                self._manager.cancel_request(run.request_id)  # the rest would never be sent
            if done or stopped:
                run.finish_reason = "stop" if stopped else self._finish_reason(run, out)
                batch.append((run, self._done(run, now)))
                finished.append(run)
        self._recent.append((now, new_tokens))
        if batch:
            listeners = self._publisher.publish([(run.job.reply_channel, ev) for run, ev in batch])
            gone = {run.job.job_id for (run, _), n in zip(batch, listeners) if n == 0 and run not in finished}
            for job_id in gone:
                # No API process listens on the reply channel: nobody will read this job.
                log.warning("job %s: its reply channel has no subscriber, cancelling", job_id)
                self.cancel(job_id)
        for run in finished:
            self._end(run, run.finish_reason or "stop")

    def _logprobs(self, picks: list[Pick]) -> list[TokenLogprob]:
        decode = self.lm.tokenizer.decode
        return [
            TokenLogprob(token=decode([p.token]), logprob=p.logprob, top=[(decode([t]), lp) for t, lp in p.top])
            for p in picks
        ]

    def _finish_reason(self, run: Run, out: GenerationOutput) -> FinishReason:
        last = out.generated_tokens[-1] if out.generated_tokens else None
        if last in self.lm.eos_token_ids:
            return "stop"
        return "length" if len(out.generated_tokens) >= run.max_tokens else "stop"

    def _done(self, run: Run, now: float) -> Done:
        first = None if run.first_token_at is None else run.first_token_at - run.submitted
        return Done(
            job_id=run.job.job_id,
            seq=self._seq.next(run.job.job_id),
            index=run.index,
            finish_reason=run.finish_reason or "stop",
            usage=Usage(prompt_tokens=len(run.prompt_ids), completion_tokens=run.tokens),
            timings=Timings(queue_s=run.queue_s, first_token_s=first, total_s=now - run.submitted),
        )

    def _error(self, run: Run, message: str) -> Error:
        log.error("job %s: engine error: %s", run.job.job_id, message)
        return Error(job_id=run.job.job_id, seq=self._seq.next(run.job.job_id), status=500,
                     error_type="server_error", code="engine_error",
                     message=f"The model failed while generating: {message}")


def engine_kwargs(max_batch: int, kv_cache_tokens: int | None, context_length: int) -> dict[str, Any]:
    """Default KV cache size: room for every batch slot at 2k tokens (or the
    context, if shorter); enough for chat on CPU without taking all memory."""
    return {"max_batch": max_batch, "kv_cache_tokens": kv_cache_tokens or max_batch * min(context_length, 2048)}
