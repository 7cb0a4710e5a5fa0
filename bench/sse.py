"""Raw server-sent events, parsed by hand rather than through the openai SDK
so that the clock reads each chunk the moment its bytes arrive, and so a
malformed stream is counted as an error instead of being smoothed over."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bench.stats import RequestResult


class SSEParser:
    """Feeds bytes in any split, yields the ``data`` of each complete event.

    Follows the SSE rules that matter here: lines end in CRLF, LF or CR
    (sse-starlette writes CRLF), a blank line ends an event, several ``data:``
    lines join with newlines, lines starting with ``:`` are comments (pings)."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while True:
            i = _line_end(self._buf)
            if i is None:
                return out
            line, width = self._buf[:i], 2 if self._buf[i : i + 2] == b"\r\n" else 1
            self._buf = self._buf[i + width :]
            event = self._line(line.decode("utf-8"))
            if event is not None:
                out.append(event)

    def close(self) -> list[str]:
        """The stream ended: a CR held back by ``feed`` was a line end after
        all. An event with no closing blank line is dropped, as the spec says."""
        out: list[str] = []
        if self._buf.endswith(b"\r"):
            out = self.feed(b"\n")  # CR then LF is one terminator, so this adds no blank line
        self._buf, self._data = b"", []
        return out

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event:, id:, retry: carry nothing we measure


def _line_end(buf: bytes) -> int | None:
    """Index of the first line terminator; a CR at the very end is held back
    because the LF of its CRLF may be in the next network chunk."""
    lf, cr = buf.find(b"\n"), buf.find(b"\r")
    if cr == len(buf) - 1 and (lf == -1 or lf > cr):
        return None
    ends = [i for i in (lf, cr) if i != -1]
    return min(ends) if ends else None


@dataclass
class Chunk:
    """What one ``data:`` payload of a chat completion stream says."""

    done: bool = False
    content: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None


def classify(data: str) -> Chunk:
    if data.strip() == "[DONE]":
        return Chunk(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return Chunk(error="bad_json")
    if not isinstance(obj, dict):
        return Chunk(error="bad_json")
    if "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        return Chunk(error=f"event:{err.get('code') or err.get('type') or 'error'}")
    chunk = Chunk(usage=obj.get("usage") or None)
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        chunk.content += delta.get("content") or ""
        chunk.finish_reason = choice.get("finish_reason") or chunk.finish_reason
    return chunk


class StreamRecorder:
    """Turns timed ``data`` payloads of one request into a ``RequestResult``."""

    def __init__(self, t_send: float) -> None:
        self.result = RequestResult(t_send=t_send)
        self._done = False

    def on_data(self, t: float, data: str) -> None:
        r = self.result
        if self._done or r.error is not None:
            return
        c = classify(data)
        if c.error is not None:
            r.error = c.error
            return
        if c.done:
            self._done = True
            return
        if c.content:  # role-only and finish-only chunks carry no token
            if r.t_first is None:
                r.t_first = t
            r.chunk_times.append(t)
            r.text += c.content
        if c.finish_reason:
            r.finish_reason = c.finish_reason
        if c.usage:
            r.completion_tokens = int(c.usage.get("completion_tokens") or 0)
            r.prompt_tokens = c.usage.get("prompt_tokens")

    def finish(self, t: float) -> RequestResult:
        r = self.result
        r.t_end = t
        if r.error is None and not self._done:
            r.error = "no_done"  # cut off mid-stream
        elif r.error is None and r.completion_tokens is None:
            r.error = "no_usage"  # cannot count tokens without it
        return r
