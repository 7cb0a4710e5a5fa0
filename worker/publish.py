"""Publishing events to API reply channels: a whole engine step in one
pipeline, never one round trip per token.

A batch line's events are kept instead (``keep``/``take``): nobody listens
to a batch, and its worker stores the line's result once, at its end
(``broker/batches.py``).

A job with an ``events_stream`` (a stored or background response) also has
each event appended to that Redis stream, in the same pipeline as the
publish, capped and with a TTL: a client that lost its connection resumes
from it through any API process, and a job nobody follows still leaves its
whole answer there."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import redis

from broker.schemas import STREAM_EVENT_FIELD, AnyEvent, Delta, Done, Started


class Publisher:
    def __init__(self, r: redis.Redis, stream_max_events: int = 100_000, stream_ttl_s: int = 30 * 24 * 3600) -> None:
        self._redis = r
        self._stream_max = stream_max_events
        self._stream_ttl_s = stream_ttl_s
        self._kept: dict[str, list[AnyEvent]] = {}
        self._streams: dict[str, str] = {}  # job id -> its events stream
        self._lock = threading.Lock()  # the engine's step thread and Celery's threads publish

    def stream(self, job_id: str, key: str) -> None:
        """From now on this job's events are also appended to stream ``key``."""
        with self._lock:
            self._streams[job_id] = key

    def unstream(self, job_id: str) -> None:
        with self._lock:
            self._streams.pop(job_id, None)

    def keep(self, job_id: str) -> None:
        """From now on this job's events are kept, not published."""
        with self._lock:
            self._kept[job_id] = []

    def take(self, job_id: str) -> list[AnyEvent]:
        """The kept events of a job, merged (``merge``); it is published again from now on."""
        with self._lock:
            return merge(self._kept.pop(job_id, []))

    def publish(self, events: Sequence[tuple[str, AnyEvent]]) -> list[int]:
        """Publish in order; returns, per event, how many subscribers got it
        (a kept or streamed event counts at least one: its job must not
        look abandoned, since its stream keeps it for a client to come)."""
        counts = [1] * len(events)
        sent: list[tuple[int, str | None]] = []  # event index, its stream
        with self._lock:
            for i, (_, event) in enumerate(events):
                kept = self._kept.get(event.job_id)
                if kept is not None:
                    kept.append(event)
                else:
                    sent.append((i, self._streams.get(event.job_id)))
        if not sent:
            return counts
        published: list[int] = []  # event indexes whose PUBLISH reply counts subscribers
        with self._redis.pipeline(transaction=False) as pipe:
            for i, key in sent:
                channel, event = events[i]
                data = event.model_dump_json()
                if channel:
                    pipe.publish(channel, data)
                    published.append(i)
                if key is not None:
                    pipe.xadd(key, {STREAM_EVENT_FIELD: data}, maxlen=self._stream_max, approximate=True)
                    pipe.expire(key, self._stream_ttl_s)
            replies = pipe.execute()
        # Replies come in command order: a PUBLISH's count, an XADD's id and an EXPIRE's flag.
        at = 0
        for i, key in sent:
            channel = events[i][0]
            if channel:
                counts[i] = int(replies[at]) if key is None else max(1, int(replies[at]))
                at += 1
            if key is not None:
                at += 2
        return counts


def merge(events: list[AnyEvent]) -> list[AnyEvent]:
    """One Delta then one Done per choice (after Started): what the API
    builds a whole answer from, a token's event each would take ~100 bytes
    apiece in Redis. Any other event (Error, Embeddings) is kept as is."""
    started: list[AnyEvent] = []
    deltas: dict[int, Delta] = {}
    dones: dict[int, Done] = {}
    other: list[AnyEvent] = []
    for ev in events:
        if isinstance(ev, Started):
            started.append(ev)
        elif isinstance(ev, Delta):
            before = deltas.get(ev.index)
            if before is None:
                deltas[ev.index] = ev.model_copy(deep=True)
                continue
            before.text += ev.text
            before.completion_tokens = ev.completion_tokens
            if ev.logprobs is not None:
                before.logprobs = (before.logprobs or []) + ev.logprobs
            if ev.tool_calls is not None:
                before.tool_calls = (before.tool_calls or []) + ev.tool_calls
        elif isinstance(ev, Done):
            dones[ev.index] = ev
        else:
            other.append(ev)
    merged: list[AnyEvent] = list(started)
    for index in sorted(deltas.keys() | dones.keys()):
        merged += [e for e in (deltas.get(index), dones.get(index)) if e is not None]
    return merged + other
