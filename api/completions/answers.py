"""Turning a running job into OpenAI responses: one JSON body, or SSE chunks
(``data: {json}``, each choice's role first, usage last when asked, then
``[DONE]``).

Chat and text completions differ only in the shape of their chunks and
logprobs, so each has a small ``Shape`` and the stream and collect loops are
shared.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from api.completions.objects import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TopLogprob,
    UsageInfo,
)
from api.errors import error_from_event
from api.jobs.interactive import Restarted, RunningJob
from api.sse import sse_event
from broker.schemas import (
    AnyEvent,
    Delta,
    Done,
    Error,
    FunctionCall,
    Job,
    Started,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    tier_of,
)


@dataclass
class ChoiceResult:
    """A choice collected for a non-streamed answer."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: dict[int, ToolCall] = field(default_factory=dict)  # by the call's index within the choice
    finish_reason: str = "stop"

    def add(self, ev: Delta) -> None:
        self.text += ev.text
        self.logprobs += ev.logprobs or []
        for piece in ev.tool_calls or []:
            call = self.calls.get(piece.index)
            if call is None:  # the first piece names the call
                self.calls[piece.index] = ToolCall(id=piece.id or "", function=FunctionCall(
                    name=piece.name or "", arguments=piece.arguments))
            else:
                call.function.arguments += piece.arguments

    def tool_calls(self) -> list[ToolCall]:
        return [self.calls[i] for i in sorted(self.calls)]


def usage_info(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class Answered(Protocol):
    """What a whole body names besides its choices: a ``RunningJob``, or a
    batch line's stored result (``api/batches/routes.py``)."""

    @property
    def job_id(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def job(self) -> Job: ...


class Shape(Protocol):
    # Streamed chunks come as JSON text, serialized by pydantic in one call:
    # they are made once per token.
    def first(self, run: RunningJob, index: int) -> str | None: ...
    def delta(self, run: RunningJob, ev: Delta) -> str: ...
    def text_frame(self, run: RunningJob, index: int) -> tuple[bytes, bytes]: ...
    def final(self, run: RunningJob, done: Done) -> str: ...
    def usage(self, run: RunningJob, usage: UsageInfo) -> str: ...
    def body(self, run: Answered, choices: list[ChoiceResult], usage: UsageInfo) -> dict[str, Any]: ...


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _frame(empty: str, key: str) -> tuple[bytes, bytes]:
    """A chunk whose text is ``""`` split around that empty string: the SSE
    event of a text-only delta is head + the text as a JSON string + tail.
    Built once per choice of a stream, so a token costs one ``json.dumps``
    of its text instead of two pydantic models and their serialization (a
    tenth of the API's CPU per token)."""
    head, found, tail = sse_event(empty).partition(f'{key}""'.encode())
    assert found, empty
    return head + key.encode(), tail


def _call_piece(piece: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed ``delta.tool_calls[]``: a call's first piece carries
    its id, type and name; later pieces only extend its arguments."""
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name or "", "arguments": piece.arguments}}


class ChatShape:
    @staticmethod
    def logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=_bytes(t.token),
                             top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=_bytes(s)) for s, lp in t.top])
            for t in items
        ])

    def _chunk(self, run: RunningJob, choice: ChatChunkChoice) -> str:
        return ChatCompletionChunk(id=run.job_id, created=run.created, model=run.job.model,
                                   service_tier=tier_of(run.job.priority), choices=[choice]).model_dump_json()

    def first(self, run: RunningJob, index: int) -> str:
        return self._chunk(run, ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""}))

    def delta(self, run: RunningJob, ev: Delta) -> str:
        # OpenAI omits unset delta fields: the role only in the first chunk,
        # content only when there is text or no call.
        lp = self.logprobs(ev.logprobs) if ev.logprobs is not None else None
        delta: dict[str, Any] = {"content": ev.text} if ev.text or not ev.tool_calls else {}
        if ev.tool_calls:
            delta["tool_calls"] = [_call_piece(p) for p in ev.tool_calls]
        return self._chunk(run, ChatChunkChoice(index=ev.index, delta=delta, logprobs=lp))

    def text_frame(self, run: RunningJob, index: int) -> tuple[bytes, bytes]:
        return _frame(self._chunk(run, ChatChunkChoice(index=index, delta={"content": ""})), '"content":')

    def final(self, run: RunningJob, done: Done) -> str:
        return self._chunk(run, ChatChunkChoice(index=done.index, delta={}, finish_reason=done.finish_reason))

    def usage(self, run: RunningJob, usage: UsageInfo) -> str:
        return ChatCompletionChunk(id=run.job_id, created=run.created, model=run.job.model, choices=[],
                                   service_tier=tier_of(run.job.priority), usage=usage).model_dump_json()

    @staticmethod
    def message(c: ChoiceResult) -> ChatMessageOut:
        calls = c.tool_calls()
        if not calls:
            return ChatMessageOut(content=c.text)
        # Text around the calls that is only whitespace is no answer: OpenAI sends null then.
        return ChatMessageOut(content=c.text if c.text.strip() else None, tool_calls=calls)

    def body(self, run: Answered, choices: list[ChoiceResult], usage: UsageInfo) -> dict[str, Any]:
        wants = run.job.sampling.logprobs is not None
        # A message without calls carries no tool_calls key at all, as OpenAI's.
        no_calls = {i: {"message": {"tool_calls"}} for i, c in enumerate(choices) if not c.calls}
        return ChatCompletion(
            id=run.job_id, created=run.created, model=run.job.model, usage=usage,
            service_tier=tier_of(run.job.priority), choices=[ChatChoice(index=c.index, message=self.message(c), finish_reason=c.finish_reason,
                                logprobs=self.logprobs(c.logprobs) if wants else None) for c in choices],
        ).model_dump(exclude={"choices": no_calls})


class CompletionShape:
    @staticmethod
    def logprobs(items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        offsets = []
        for t in items:
            offsets.append(offset)
            offset += len(t.token)
        return CompletionLogprobs(
            tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
            top_logprobs=[dict(t.top) for t in items], text_offset=offsets,
        )

    def _chunk(self, run: RunningJob, choice: CompletionChoice) -> str:
        return Completion(id=run.job_id, created=run.created, model=run.job.model, choices=[choice],
                          service_tier=tier_of(run.job.priority)).model_dump_json(exclude={"usage"})

    def first(self, run: RunningJob, index: int) -> None:
        return None

    def delta(self, run: RunningJob, ev: Delta) -> str:
        lp = self.logprobs(ev.logprobs, 0) if ev.logprobs is not None else None
        return self._chunk(run, CompletionChoice(index=ev.index, text=ev.text, logprobs=lp))

    def text_frame(self, run: RunningJob, index: int) -> tuple[bytes, bytes]:
        return _frame(self._chunk(run, CompletionChoice(index=index, text="")), '"text":')

    def final(self, run: RunningJob, done: Done) -> str:
        return self._chunk(run, CompletionChoice(index=done.index, text="", finish_reason=done.finish_reason))

    def usage(self, run: RunningJob, usage: UsageInfo) -> str:
        return Completion(id=run.job_id, created=run.created, model=run.job.model, choices=[],
                          service_tier=tier_of(run.job.priority), usage=usage).model_dump_json()

    def body(self, run: Answered, choices: list[ChoiceResult], usage: UsageInfo) -> dict[str, Any]:
        wants = run.job.sampling.logprobs is not None
        out = []
        for c in choices:
            # With echo the prompt text comes first; logprobs cover the completion after it.
            start = len(c.text) - sum(len(t.token) for t in c.logprobs)
            out.append(CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason,
                                        logprobs=self.logprobs(c.logprobs, start) if wants else None))
        return Completion(id=run.job_id, created=run.created, model=run.job.model, choices=out,
                          service_tier=tier_of(run.job.priority), usage=usage).model_dump()


def replay(answered: Answered, shape: Shape, events: list[AnyEvent]) -> dict[str, Any]:
    """The body ``collect`` would have built from these events (a batch
    line's, stored by its worker). An Error among them raises it."""
    choices = [ChoiceResult(index=i) for i in range(answered.job.n)]
    prompt_tokens = completion_tokens = 0
    for ev in events:
        if isinstance(ev, Started):
            prompt_tokens = ev.prompt_tokens
        elif isinstance(ev, Delta):
            choices[ev.index].add(ev)
        elif isinstance(ev, Done):
            choices[ev.index].finish_reason = ev.finish_reason
            completion_tokens += ev.usage.completion_tokens
            prompt_tokens = ev.usage.prompt_tokens
        elif isinstance(ev, Error):
            raise error_from_event(ev)
    return shape.body(answered, choices, usage_info(prompt_tokens, completion_tokens))


async def stream(run: RunningJob, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE events for one job. The ``finally`` cancels the job when the
    client leaves (Starlette cancels this generator then)."""
    completion_tokens = 0
    frames: dict[int, tuple[bytes, bytes]] = {}  # per choice: a text-only delta's event around its text
    try:
        for index in range(run.job.n):
            first = shape.first(run, index)
            if first is not None:
                yield sse_event(first)
        async for ev in run.events():
            if isinstance(ev, Delta):
                if ev.logprobs is None and not ev.tool_calls:
                    if ev.text:
                        head, tail = frames.get(ev.index) or frames.setdefault(ev.index, shape.text_frame(run, ev.index))
                        yield head + json.dumps(ev.text, ensure_ascii=False).encode() + tail
                elif ev.text or ev.logprobs or ev.tool_calls:
                    yield sse_event(shape.delta(run, ev))
            elif isinstance(ev, Done):
                completion_tokens += ev.usage.completion_tokens
                yield sse_event(shape.final(run, ev))
            elif isinstance(ev, Error):
                # Mid-stream errors keep OpenAI's error shape; the SDK raises on them.
                run.metrics.observe_error(ev.status, ev.code)
                yield sse_event(json.dumps(error_from_event(ev).body(), separators=(",", ":")))
        if include_usage and run.finished and not run.failed:
            yield sse_event(shape.usage(run, usage_info(run.started.prompt_tokens, completion_tokens)))
        yield sse_event("[DONE]")
    finally:
        await asyncio.shield(run.close())


async def collect(run: RunningJob, shape: Shape) -> dict[str, Any]:
    """The whole answer as one body. Run it under ``CancelOnHangUp``: a
    non-streaming route is not cancelled when its client leaves."""
    choices = [ChoiceResult(index=i) for i in range(run.job.n)]
    completion_tokens = 0
    try:
        async for ev in run.events(client_saw_tokens=False):
            if isinstance(ev, Restarted):  # a new worker starts over
                choices = [ChoiceResult(index=i) for i in range(run.job.n)]
                completion_tokens = 0
            elif isinstance(ev, Delta):
                choices[ev.index].add(ev)
            elif isinstance(ev, Done):
                choices[ev.index].finish_reason = ev.finish_reason
                completion_tokens += ev.usage.completion_tokens
            elif isinstance(ev, Error):
                raise error_from_event(ev)
        return shape.body(run, choices, usage_info(run.started.prompt_tokens, completion_tokens))
    finally:
        await asyncio.shield(run.close())
