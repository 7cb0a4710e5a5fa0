"""A response, rebuilt from its events stream: OpenAI's stream events and
the Response object, as a pure fold of (the stored request) + (the stream's
entries, in order).

Every API process folds the same entries the same way, so the events get
the same ``sequence_number`` everywhere: ``response.created`` is 0 and each
next event is one more, and ``starting_after=N`` means "the events after
the N-th" on any process. The Response object ``GET`` returns is the fold's
state after the last entry.

The entries are the worker's events (field ``event``: a ``broker.schemas``
event of the response's current job) and the API's own marks (field
``api``: a ``Mark``). The first terminal entry (a Done, an Error, a
``cancelled`` or ``failed`` mark) ends the response; nothing after it counts.
A ``resubmitted`` mark names the job that now runs the response: events of
an earlier attempt that come later are ignored.

What each entry adds:

    Started (first)  response.in_progress
    Delta            text: an output message (output_item.added,
                     content_part.added once) and output_text.delta; a
                     tool call: a function_call item (output_item.added) and
                     function_call_arguments.delta. Opening an item closes
                     the one before it (…done events).
    Done             closes the open item, then response.completed, or
                     response.incomplete (length: max_output_tokens)
    Error / failed   closes the open item, then response.failed
    cancelled        closes the open item, then response.failed whose
                     response has status "cancelled" (OpenAI's stream has no
                     event of its own for it)

Text that is only whitespace does not open a message: the demo model's tool
calls come with newlines around them, which OpenAI sends as no message at
all. It is kept and sent with the first text that is not whitespace (or at
the end, when no function call was made).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from api.responses.protocol import StoredResponse
from broker.schemas import (
    STREAM_EVENT_FIELD,
    Delta,
    Done,
    Error,
    FunctionCall,
    Message,
    Started,
    ToolCall,
    ToolCallDelta,
    parse_event,
)

# The entry fields: the worker's (broker.schemas.STREAM_EVENT_FIELD) and the API's.
EVENT_FIELD = STREAM_EVENT_FIELD
API_FIELD = "api"

# A stream entry: its id and its fields (bytes as Redis gives them, or str).
Fields = Mapping[Any, bytes | str]
Entry = tuple[str, Fields]
Status = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
# A worker's error names the job's field; the client named the request's.
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


class Mark(BaseModel):
    """An entry of the API's own in a response's stream."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cancelled", "failed", "resubmitted"]
    job_id: str | None = None  # resubmitted: the new job
    code: str | None = None  # failed
    message: str | None = None
    status: int | None = None  # failed: the HTTP status a waiting request is answered with


def entry_ms(entry_id: str) -> int:
    """When Redis appended an entry (its id is "<ms>-<n>")."""
    return int(entry_id.split("-", 1)[0])


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class _Item:
    """One output item while the fold builds it."""

    id: str
    kind: Literal["message", "function_call"]
    text: str = ""  # a message's text, a call's arguments
    call_id: str = ""
    name: str = ""
    open: bool = True
    status: str = "in_progress"

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "message":
            return {"id": self.id, "type": "message", "status": self.status, "role": "assistant",
                    "content": [] if self.open and not self.text else [_part(self.text)]}
        return {"id": self.id, "type": "function_call", "status": self.status, "call_id": self.call_id,
                "name": self.name, "arguments": self.text}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponseFold:
    """Feed it a response's entries in order; it says which OpenAI events
    each one adds and what the response is now."""

    record: StoredResponse
    seq: int = 0  # the next event's sequence_number
    job_id: str = ""  # the job that now runs the response
    attempts: int = 0  # resubmissions so far
    worker: str | None = None  # who started the current job
    had_delta: bool = False  # the current job sent a Delta
    job_since_ms: int = 0  # when the current job was sent (its response created, or resubmitted)
    last_ms: int = 0  # the last entry of the current job, or its sending
    last_id: str = "0-0"  # the last entry folded
    status: Status = "queued"
    ended_ms: int | None = None
    error: dict[str, Any] | None = None
    error_code: str | None = None  # llmq's code of the error
    error_status: int | None = None  # HTTP status of the error, for a request that waited for the end
    error_param: str | None = None
    incomplete: dict[str, Any] | None = None
    input_tokens: int | None = None
    output_tokens: int = 0
    _items: list[_Item] = field(default_factory=list)
    _calls: dict[int, int] = field(default_factory=dict)  # a call's index in its choice -> output index
    _pending: str = ""  # whitespace not yet in a message
    _opened: bool = False
    _started_once: bool = False

    def __post_init__(self) -> None:
        self.job_id = self.record.job.job_id
        self.job_since_ms = self.last_ms = self.record.created_at * 1000
        self.status = "queued" if self.record.background else "in_progress"

    @property
    def ended(self) -> bool:
        return self.ended_ms is not None

    # ------------------------------------------------------------- feeding

    def opening(self) -> list[dict[str, Any]]:
        """The events before any entry: ``response.created``."""
        if self._opened:
            return []
        self._opened = True
        return [self._event("response.created", response=self.response())]

    def feed(self, entry_id: str, fields: Fields) -> list[dict[str, Any]]:
        """The events this entry adds (none once the response has ended)."""
        out = self.opening()
        self.last_id = entry_id
        if self.ended:
            return out
        values = {_str(k): v for k, v in fields.items()}
        ms = entry_ms(entry_id)
        if API_FIELD in values:
            try:
                mark = Mark.model_validate_json(values[API_FIELD])
            except ValidationError:
                return out
            return out + self._mark(mark, ms)
        if EVENT_FIELD not in values:
            return out
        try:
            ev = parse_event(values[EVENT_FIELD])
        except ValidationError:
            return out
        if ev.job_id != self.job_id:
            return out  # a late event of an attempt given up on
        self.last_ms = ms
        if isinstance(ev, Started):
            return out + self._started(ev)
        if isinstance(ev, Delta):
            return out + self._delta(ev)
        if isinstance(ev, Done):
            return out + self._done(ev, ms)
        if isinstance(ev, Error):
            param = PARAMS.get(ev.param, ev.param) if ev.param else None
            return out + self._fail(ms, ev.code or ev.error_type, ev.message, ev.status, param)
        return out

    def _mark(self, mark: Mark, ms: int) -> list[dict[str, Any]]:
        if mark.kind == "resubmitted":
            if not mark.job_id or self.had_delta:
                return []  # never after a token: the client has the first attempt's text (keepers never do this)
            self.job_id, self.worker, self.had_delta = mark.job_id, None, False
            self.attempts += 1
            self.job_since_ms = self.last_ms = ms
            return []
        if mark.kind == "cancelled":
            return self._end(ms, "cancelled")
        return self._fail(ms, mark.code or "server_error", mark.message or "The response failed.", mark.status or 500,
                          None)

    def _started(self, ev: Started) -> list[dict[str, Any]]:
        self.worker = ev.worker
        self.input_tokens = ev.prompt_tokens
        if self._started_once:
            return []  # a resubmitted job started: the client saw in_progress already
        self._started_once = True
        self.status = "in_progress"
        return [self._event("response.in_progress", response=self.response())]

    def _delta(self, ev: Delta) -> list[dict[str, Any]]:
        self.had_delta = True
        self.output_tokens = max(self.output_tokens, ev.completion_tokens)
        out: list[dict[str, Any]] = []
        if ev.text:
            out += self._text(ev.text)
        for piece in ev.tool_calls or []:
            out += self._call_piece(piece)
        return out

    def _text(self, text: str) -> list[dict[str, Any]]:
        current = self._open_item()
        if current is not None and current.kind == "message":
            return [self._append(current, text)]
        if not (self._pending + text).strip():
            self._pending += text
            return []
        text, self._pending = self._pending + text, ""
        return self._open_message(text)

    def _open_message(self, text: str) -> list[dict[str, Any]]:
        out = self._close_open()
        item = self._add(_Item(id=self._item_id("msg"), kind="message"))
        index = len(self._items) - 1
        out += [self._event("response.output_item.added", output_index=index, item=item.as_dict()),
                self._event("response.content_part.added", item_id=item.id, output_index=index, content_index=0,
                            part=_part(""))]
        return [*out, self._append(item, text)]

    def _append(self, item: _Item, text: str) -> dict[str, Any]:
        item.text += text
        return self._event("response.output_text.delta", item_id=item.id, output_index=self._items.index(item),
                           content_index=0, delta=text, logprobs=[])

    def _call_piece(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if piece.id is not None or piece.index not in self._calls:
            self._pending = ""  # whitespace around calls is no answer
            out += self._close_open()
            item = self._add(_Item(id=self._item_id("fc"), kind="function_call", call_id=piece.id or "",
                                   name=piece.name or ""))
            self._calls[piece.index] = len(self._items) - 1
            out.append(self._event("response.output_item.added", output_index=len(self._items) - 1,
                                   item=item.as_dict()))
        index = self._calls[piece.index]
        item = self._items[index]
        if piece.arguments:
            item.text += piece.arguments
            out.append(self._event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                                   delta=piece.arguments))
        return out

    def _done(self, ev: Done, ms: int) -> list[dict[str, Any]]:
        self.input_tokens = ev.usage.prompt_tokens
        self.output_tokens = ev.usage.completion_tokens
        if ev.finish_reason == "length":
            self.incomplete = {"reason": "max_output_tokens"}
            return self._end(ms, "incomplete")
        if ev.finish_reason == "cancelled":
            return self._end(ms, "cancelled")
        return self._end(ms, "completed")

    def _fail(self, ms: int, code: str, message: str, status: int, param: str | None) -> list[dict[str, Any]]:
        # The object's code is one of OpenAI's; llmq's own (worker_lost,
        # context_length_exceeded...) is what a waiting request's HTTP error carries.
        public = "rate_limit_exceeded" if status == 429 else "invalid_prompt" if status < 500 else "server_error"
        self.error = {"code": public, "message": message}
        self.error_code, self.error_status, self.error_param = code, status, param
        return self._end(ms, "failed")

    def _end(self, ms: int, status: Status) -> list[dict[str, Any]]:
        out = []
        if self._pending and not self._items:
            # A whitespace-only answer is still the answer when no call was made.
            out, self._pending = self._open_message(self._pending), ""
        self.ended_ms, self.status = ms, status
        out += self._close_open("completed" if status == "completed" else "incomplete")
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status, "response.failed")
        out.append(self._event(kind, response=self.response()))
        return out

    # ------------------------------------------------------------- items

    def _add(self, item: _Item) -> _Item:
        self._items.append(item)
        return item

    def _item_id(self, prefix: str) -> str:
        # Deterministic: every API process names the same item the same way.
        return f"{prefix}_{self.record.id.removeprefix('resp_')}_{len(self._items)}"

    def _open_item(self) -> _Item | None:
        return self._items[-1] if self._items and self._items[-1].open else None

    def _close_open(self, status: str = "completed") -> list[dict[str, Any]]:
        item = self._open_item()
        if item is None:
            return []
        item.open, item.status = False, status
        index = len(self._items) - 1
        if item.kind == "message":
            return [self._event("response.output_text.done", item_id=item.id, output_index=index, content_index=0,
                                text=item.text, logprobs=[]),
                    self._event("response.content_part.done", item_id=item.id, output_index=index, content_index=0,
                                part=_part(item.text)),
                    self._event("response.output_item.done", output_index=index, item=item.as_dict())]
        return [self._event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                            arguments=item.text),
                self._event("response.output_item.done", output_index=index, item=item.as_dict())]

    def _event(self, kind: str, **body: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **body}
        self.seq += 1
        return event

    # ------------------------------------------------------------- what it is now

    def usage(self) -> dict[str, Any] | None:
        if self.input_tokens is None:
            return None
        return {"input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens}

    def output_text(self) -> str:
        return "".join(i.text for i in self._items if i.kind == "message")

    def response(self) -> dict[str, Any]:
        """The Response object now (OpenAI's shape)."""
        r = self.record
        done = self.ended and self.status == "completed"
        return {
            "id": r.id, "object": "response", "created_at": r.created_at, "status": self.status,
            "background": r.background, "error": self.error, "incomplete_details": self.incomplete,
            "model": r.model, "output": [i.as_dict() for i in self._items], "max_tool_calls": None,
            "reasoning": {"effort": None, "summary": None}, "store": r.store, "top_logprobs": 0,
            "usage": self.usage() if self.ended else None,
            "completed_at": self.ended_ms / 1000 if done and self.ended_ms is not None else None,
            **r.echo,
        }

    def assistant_turn(self) -> Message | None:
        """The output as one assistant message, for a next turn's history."""
        calls = [ToolCall(id=i.call_id, function=FunctionCall(name=i.name, arguments=i.text))
                 for i in self._items if i.kind == "function_call"]
        text = self.output_text()
        if not text and not calls:
            return None
        return Message(role="assistant", content=text, tool_calls=calls or None)


def fold(record: StoredResponse, entries: list[Entry]) -> tuple[ResponseFold, list[dict[str, Any]]]:
    """The whole fold of these entries: its state and every event, in order."""
    state = ResponseFold(record)
    events = state.opening()
    for entry_id, fields in entries:
        events += state.feed(entry_id, fields)
    return state, events
