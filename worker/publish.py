"""Publishing events to API reply channels: a whole engine step in one
pipeline, never one round trip per token.

A batch line's events are kept instead (``keep``/``take``): nobody listens
to a batch, and its worker stores the line's result once, at its end
(``broker/batches.py``)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import redis

from broker.schemas import AnyEvent, Delta, Done, Started


class Publisher:
    def __init__(self, r: redis.Redis) -> None:
        self._redis = r
        self._kept: dict[str, list[AnyEvent]] = {}
        self._lock = threading.Lock()  # the engine's step thread and Celery's threads publish

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
        (a kept event counts as one: its job must not look abandoned)."""
        counts = [1] * len(events)
        sent: list[int] = []
        with self._lock:
            for i, (_, event) in enumerate(events):
                kept = self._kept.get(event.job_id)
                if kept is not None:
                    kept.append(event)
                else:
                    sent.append(i)
        if sent:
            with self._redis.pipeline(transaction=False) as pipe:
                for i in sent:
                    channel, event = events[i]
                    pipe.publish(channel, event.model_dump_json())
                for i, n in zip(sent, pipe.execute()):
                    counts[i] = int(n)
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
