"""Batch state both sides touch in Redis: what a worker reads before it runs
a line, and how it stores the line's result exactly once. The API owns the
rest of a batch's life (``api/batches/routes.py``).

A line's result is written with HSETNX into the batch's results hash, and
its count goes up in the same script: a line that runs twice (a redelivered
copy after its worker died, an enqueue repeated after an API process died, a
line its worker put back on the queue when Redis did not answer, as
``worker/runtime.py`` does) is stored and counted once, whichever copy ends
first.
"""

from __future__ import annotations

import redis

from broker.keys import Keys
from broker.schemas import LineResult

# Statuses, as OpenAI names them.
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
FINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})

# KEYS[1] results hash, KEYS[2] batch hash; ARGV[1] line index, ARGV[2] the
# LineResult JSON, ARGV[3] the count it adds to. Returns 1 if stored, 0 if
# the line already had a result or the batch is gone (a late line must not
# recreate its keys without their TTL).
_RECORD = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
"""


def record_args(keys: Keys, batch_id: str, result: LineResult) -> tuple[str, int, str, str, int, str, str]:
    """``eval`` arguments that store ``result`` (for sync and asyncio clients alike)."""
    return (_RECORD, 2, keys.batch_results(batch_id), keys.batch(batch_id), result.index,
            result.model_dump_json(), "failed" if result.failed else "completed")


def record(r: redis.Redis, keys: Keys, batch_id: str, result: LineResult) -> bool:
    """Store a line's result unless it has one; True if this call stored it."""
    return bool(r.eval(*record_args(keys, batch_id, result)))


def has_result(r: redis.Redis, keys: Keys, batch_id: str, index: int) -> bool:
    return bool(r.hexists(keys.batch_results(batch_id), str(index)))


def batch_status(r: redis.Redis, keys: Keys, batch_id: str) -> str | None:
    """The batch's status (None: the batch is gone, e.g. deleted or expired)."""
    raw = r.hget(keys.batch(batch_id), "status")
    return raw.decode() if raw is not None else None
