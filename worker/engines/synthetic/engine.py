"""The synthetic engine (declared in ``__init__.py``): one clock task on the
loop of ``worker/engines/loop.py`` steps every running row at once.

A choice is one request (``PER_CHOICE``); its task queues a ``Row`` and
waits for the clock to end it. Each step the clock admits waiting rows up
to the batch size, sleeps the step time plus the admitted prompts' prefill,
then gives every row its next token and publishes the step's updates in one
write. A cancelled request's row is dropped at the next step. The clock
keeps its pace from step to step (a late step does not shorten the next),
so what a load test measures on top of it is llmq's own cost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from broker.schemas import FinishReason, Job, TokenLogprob
from worker.engines.loop import LoopEngine, Request
from worker.engines.protocol import Choice, Update
from worker.engines.synthetic import SyntheticOptions
from worker.engines.synthetic.answers import (
    CHOSEN_LOGPROB,
    Piece,
    check,
    fixed_text,
    free_text,
    pieces_of,
    top_logprobs,
)
from worker.engines.synthetic.words import PASSAGE, WordTokenizer
from worker.engines.transformers.stops import StopStrings
from worker.loading import ModelSpec, load_tokenizer
from worker.publish import Publisher
from worker.toolcalls import format_for

log = logging.getLogger("llmq.worker.engines.synthetic")

CONTEXT_LENGTH = 8192  # without --context-length or a tokenizer that says
BANNED = -100.0  # a logit bias this low bans its token, as OpenAI documents


@dataclass(eq=False)
class Row:
    """One choice as the clock runs it."""

    choice: Choice
    pieces: Iterator[Piece]
    passage: list[Piece]  # the alternatives logprobs name
    limit: int  # tokens before it ends: max_tokens, or the answer's own length
    finish_at_limit: FinishReason
    stops: StopStrings
    logprobs: int | None
    done: asyncio.Future[None]
    tokens: int = 0
    dropped: bool = False

    def next(self) -> Update:
        piece, _ = next(self.pieces, ("", 0))
        self.tokens += 1
        text, hit = self.stops.feed(piece)
        finish: FinishReason | None = "stop" if hit else None
        if finish is None and self.tokens >= self.limit:
            finish = self.finish_at_limit
            text += self.stops.flush()
        logprobs = None if self.logprobs is None else [
            TokenLogprob(token=piece, logprob=CHOSEN_LOGPROB,
                         top=top_logprobs(piece, self.logprobs, self.passage, self.tokens))]
        return Update(self.choice, text=text, tokens=1, logprobs=logprobs, finish=finish)


class SyntheticEngine(LoopEngine):
    kind = "synthetic"
    PER_CHOICE = True

    def __init__(self, spec: ModelSpec, options: SyntheticOptions, publisher: Publisher) -> None:
        if spec.path:
            self.tokenizer: Any = load_tokenizer(spec)
            known = getattr(self.tokenizer, "model_max_length", None)
            context = known if isinstance(known, int) and known < 10**7 else CONTEXT_LENGTH
        else:
            self.tokenizer, context = WordTokenizer(), CONTEXT_LENGTH
        self.vocab_size = len(self.tokenizer)
        self.context_length = spec.context_length or context
        self.device = "synthetic"
        self.options = options
        self._passage = pieces_of(self.tokenizer, PASSAGE)
        self._eos = getattr(self.tokenizer, "eos_token_id", None)
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._wake = asyncio.Event()
        super().__init__(spec.served_names(), format_for(self.tokenizer, options.tool_call_parser), publisher,
                         stream_interval=options.stream_interval)
        self._stepper = asyncio.run_coroutine_threadsafe(self._steps(), self._loop)
        log.info("synthetic engine for %s: %.1f ms a step, %.1f µs prefill a prompt token, up to %d rows, "
                 "%d-token answers, %s", ",".join(self.names), options.step_s * 1000,
                 options.prefill_s_per_token * 1e6, options.max_batch_size, options.output_tokens,
                 f"tokenizer of {spec.path}" if spec.path else "its own word list")

    def healthy(self) -> bool:
        return self._loop_thread.is_alive() and not self._stepper.done()

    def check(self, job: Job) -> None:
        check(job)

    async def generate(self, request: Request) -> None:
        (choice,) = request.choices
        row = self._row(request.job, choice, request.max_tokens)
        self._waiting.append(row)
        self._wake.set()
        try:
            await row.done
        finally:
            row.dropped = True  # cancelled: the clock lets it go at its next step

    def _row(self, job: Job, choice: Choice, max_tokens: int) -> Row:
        """A constrained answer ends with its text; free text after the
        answer length, unless the end token is banned."""
        fixed = fixed_text(job, choice.index, self.tool_format)
        own: int | None
        banned = {token for token, bias in (job.sampling.logit_bias or {}).items() if bias <= BANNED}
        pieces: Iterator[Piece]
        if fixed is not None:
            fixed_pieces = pieces_of(self.tokenizer, fixed)
            pieces, own = iter(fixed_pieces), len(fixed_pieces)
        else:
            pieces = free_text(job, choice.index, self._passage, banned)
            own = None if self._eos in banned else self.options.output_tokens
        limit, finish = (max_tokens, "length") if own is None or max_tokens < own else (own, "stop")
        return Row(choice=choice, pieces=pieces, passage=self._passage, limit=limit, finish_at_limit=finish,
                   stops=StopStrings(job.stop), logprobs=job.sampling.logprobs, done=self._loop.create_future())

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        batch = max(1, self.options.max_batch_size)
        due = loop.time()
        while True:
            self._running = [r for r in self._running if not r.dropped]
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
            admitted = 0
            while self._waiting and len(self._running) < batch:
                row = self._waiting.popleft()
                if not row.dropped:
                    self._running.append(row)
                    admitted += len(row.choice.prompt_ids)
            due = max(due + self.options.step_s + admitted * self.options.prefill_s_per_token, loop.time())
            await asyncio.sleep(due - loop.time())
            live = [r for r in self._running if not r.dropped]
            if not live:
                continue
            updates = [row.next() for row in live]
            self.tick()
            self.put(updates)
            for update, row in zip(updates, live, strict=True):
                if update.finish is not None:
                    row.dropped = True
                    if not row.done.done():
                        row.done.set_result(None)

    def shut_down(self) -> None:
        self._stepper.cancel()
