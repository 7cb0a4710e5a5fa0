"""How long a job may wait for a worker, and when a refused client should
come back.

A job's **max queue time** is the ``x-llmq-max-queue-time`` header (seconds),
else its API key's ``max_queue_time_s`` (``api/keys.py``), else the server's
``LLMQ_MAX_QUEUE_TIME_S``; none of them: it waits up to
``first_event_timeout_s``, which also caps the others. A job still queued
past it is dropped before any engine work, and its client gets a 429
``max_queue_time_exceeded`` (``Jobs.give_up``; Celery's ``expires`` drops
the message itself, so Flower shows it as revoked).

**Retry-After** on such a 429 or a full queue is the model's queue depth
over its drain rate (the jobs per second its live workers finished lately,
from their heartbeats): about when the jobs ahead of a retry will have
left. Bounded by ``retry_after_s`` and ``max_retry_after_s``; while no
drain rate is known (no worker finished a job lately) it is
``retry_after_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from api.errors import APIError
from api.keys import NamedKey
from broker.settings import Settings

MAX_QUEUE_TIME_HEADER = "x-llmq-max-queue-time"


def max_queue_s(headers: Mapping[str, str], key: NamedKey | None, settings: Settings) -> float | None:
    """The request's max queue time in seconds (None: no deadline of its own)."""
    raw = headers.get(MAX_QUEUE_TIME_HEADER)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise APIError(400, f"The header '{MAX_QUEUE_TIME_HEADER}' must be a positive number of seconds, not "
                           f"{raw[:40]!r}.", param=MAX_QUEUE_TIME_HEADER, code="invalid_value")
    elif key is not None and key.max_queue_time_s is not None:
        value = key.max_queue_time_s
    elif settings.max_queue_time_s is not None:
        value = settings.max_queue_time_s
    else:
        return None
    return min(value, settings.first_event_timeout_s)


def retry_after_s(waiting: int, drain_per_s: float, settings: Settings) -> int:
    """Seconds until ``waiting`` jobs have drained at ``drain_per_s``, bounded."""
    if drain_per_s <= 0:
        return settings.retry_after_s
    return max(settings.retry_after_s, min(settings.max_retry_after_s, math.ceil(waiting / drain_per_s)))
