"""A batch's state in Redis, as OpenAI's Batch object, and every change to it.

The batch hash (``Keys.batch``) holds ``status``, ``object`` (the Batch JSON
less its counts) and the counts ``total``, ``completed``, ``failed``,
``enqueued``, which workers bump as lines end (``broker/batches.py``). The
keeper (``api/batches/keeper.py``) adds a few fields of its own: ``input`` (a
copy of the input file while the batch is open, so deleting the file does
not orphan it), ``finalize_as`` (completed or expired, while finalizing) and
``output_file`` / ``error_file`` (the result files' ids, chosen once).

Every change of status is a compare-and-set on ``status`` (one Lua script),
so the keeper and a cancel sent to any API process never overwrite each
other, and ``status`` always equals the object's status.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field, field_validator

from api.completions.protocol import Request
from api.errors import APIError, invalid
from broker.batches import CANCELLING, FINAL, FINALIZING, VALIDATING, record_args
from broker.keys import Keys
from broker.schemas import LineResult
from broker.settings import Settings

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
COMPLETION_WINDOWS_S = {"24h": 24 * 3600}  # OpenAI's only window
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
LIST_BATCH = 100  # batches read per round trip when listing

# KEYS[1] the batch hash. ARGV[1]: the statuses it may be in now, space
# separated; ARGV[2..]: field, value pairs to set (the new status among
# them). 1 if set; 0 if the batch is gone or in another status.
_TRANSITION = """
local now = redis.call('HGET', KEYS[1], 'status')
if not now then return 0 end
for want in string.gmatch(ARGV[1], '%S+') do
  if now == want then
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    return 1
  end
end
return 0
"""
# KEYS[1] a lease; ARGV[1] its holder, ARGV[2] milliseconds. Renew or drop
# it only if this process still holds it.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# ----------------------------------------------------------------- wire models


class BatchCreateRequest(Request):
    input_file_id: str = Field(min_length=1)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise invalid("metadata", f"'metadata' holds at most {MAX_METADATA_PAIRS} pairs; got {len(value)}.")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise invalid("metadata", f"'metadata' keys are at most {MAX_METADATA_KEY} characters; "
                              f"{key[:20]!r}... has {len(key)}.")
            if len(item) > MAX_METADATA_VALUE:
                raise invalid("metadata", f"'metadata' values are at most {MAX_METADATA_VALUE} characters; "
                              f"the value of {key!r} has {len(item)}.")
        return value


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = Field(default=None, description="1-based line of the input file")


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def batch_not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")


# ------------------------------------------------------------------ the store


@dataclass(frozen=True)
class BatchState:
    """A batch as the keeper sees it: the object, with its counts, and the
    keeper's own fields."""

    batch: Batch
    enqueued: int
    finalize_as: str | None

    @property
    def done(self) -> int:
        return self.batch.request_counts.completed + self.batch.request_counts.failed


def _int(raw: bytes | None) -> int:
    return int(raw) if raw is not None else 0


class BatchStore:
    """Built once at start-up and kept on ``app.state.batches``."""

    _FIELDS = ["object", "total", "completed", "failed", "enqueued", "finalize_as"]

    def __init__(self, r: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self._redis = r
        self._keys = keys
        self._keep_s = settings.files_ttl_s  # a batch outlives its window as long as a file is kept

    # -- the object

    async def create(self, body: BatchCreateRequest) -> Batch:
        clock = time.time()
        now = int(clock)
        batch = Batch(id=f"batch_{uuid.uuid4().hex}", endpoint=body.endpoint, input_file_id=body.input_file_id,
                      completion_window=body.completion_window, status=VALIDATING, created_at=now,
                      expires_at=now + COMPLETION_WINDOWS_S[body.completion_window], metadata=body.metadata)
        key = self._keys.batch(batch.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"status": batch.status, "object": _object(batch), "total": 0, "completed": 0,
                                    "failed": 0, "enqueued": 0})
            pipe.expireat(key, self.deadline(batch))
            pipe.zadd(self._keys.batches(), {batch.id: clock})
            pipe.sadd(self._keys.batches_open(), batch.id)
            await pipe.execute()
        return batch

    def deadline(self, batch: Batch) -> int:
        """When its keys go: the window, then as long as its files are kept."""
        return batch.expires_at + self._keep_s

    async def get(self, batch_id: str) -> Batch:
        state = await self.state(batch_id)
        if state is None:
            raise batch_not_found(batch_id)
        return state.batch

    async def state(self, batch_id: str) -> BatchState | None:
        raw = await self._redis.hmget(self._keys.batch(batch_id), self._FIELDS)
        return _state(raw)

    async def states(self, batch_ids: list[str]) -> list[BatchState | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(self._keys.batch(batch_id), self._FIELDS)
            raws = await pipe.execute()
        return [_state(raw) for raw in raws]

    async def transition(self, batch: Batch, expected: Iterable[str], **fields: str | int) -> bool:
        """Write ``batch`` (its status and object, and ``fields``) if its
        status is now one of ``expected``; False if it is not."""
        pairs = ["status", batch.status, "object", _object(batch)]
        for name, value in fields.items():
            pairs += [name, str(value)]
        key = self._keys.batch(batch.id)
        return bool(await self._redis.eval(_TRANSITION, 1, key, " ".join(expected), *pairs))  # type: ignore[misc]

    async def cancel(self, batch_id: str) -> Batch:
        while True:  # until the status it was read in is the one it is changed from
            batch = await self.get(batch_id)
            if batch.status == CANCELLING:
                return batch
            if batch.status in FINAL or batch.status == FINALIZING:
                raise APIError(409, f"Batch {batch_id} is {batch.status}; only a batch that is validating or in "
                               "progress can be cancelled.", param="batch_id", code="batch_not_cancellable")
            cancelling = batch.model_copy(update={"status": CANCELLING, "cancelling_at": int(time.time())})
            if await self.transition(cancelling, [batch.status]):
                return cancelling

    async def page(self, limit: int, after: str | None) -> BatchList:
        """A page of batches after ``after`` (an id), newest first."""
        index = self._keys.batches()
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(index, after)
            if rank is None:
                raise invalid("after", f"'after' names no batch: {after}")
            start = rank + 1
        page: list[Batch] = []
        while len(page) <= limit:
            want = min(limit + 1 - len(page), LIST_BATCH)  # the page and one more, to know if there are more
            ids = [i.decode() for i in await self._redis.zrevrange(index, start, start + want - 1)]
            if not ids:
                break
            start += len(ids)
            states = await self.states(ids)
            gone = [i for i, s in zip(ids, states) if s is None]  # expired: their index entries go too
            if gone:
                await self._redis.zrem(index, *gone)
                start -= len(gone)
            page += [s.batch for s in states if s is not None]
        more = len(page) > limit
        page = page[:limit]
        return BatchList(data=page, has_more=more, first_id=page[0].id if page else None,
                         last_id=page[-1].id if page else None)

    # -- what the keeper reads and writes

    async def open_ids(self) -> list[str]:
        return sorted(i.decode() for i in await self._redis.smembers(self._keys.batches_open()))

    async def close(self, batch_id: str) -> None:
        """A final batch leaves the open set and drops its input copy."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._keys.batches_open(), batch_id)
            pipe.hdel(self._keys.batch(batch_id), "input")
            await pipe.execute()

    async def keep_until(self, batch: Batch) -> None:
        """The results hash is made by the first worker to store a line, with
        no expiry: it gets the batch's."""
        deadline = self.deadline(batch)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.expireat(self._keys.batch(batch.id), deadline)
            pipe.expireat(self._keys.batch_results(batch.id), deadline)
            await pipe.execute()

    async def input_copy(self, batch_id: str) -> bytes | None:
        raw = await self._redis.hget(self._keys.batch(batch_id), "input")
        return bytes(raw) if raw is not None else None

    async def save_input(self, batch_id: str, content: bytes) -> None:
        await self._redis.hset(self._keys.batch(batch_id), "input", content)

    async def set_enqueued(self, batch_id: str, position: int) -> None:
        await self._redis.hset(self._keys.batch(batch_id), "enqueued", str(position))

    async def status(self, batch_id: str) -> str | None:
        raw = await self._redis.hget(self._keys.batch(batch_id), "status")
        return raw.decode() if raw is not None else None

    async def result_file_ids(self, batch_id: str, output_id: str, error_id: str) -> tuple[str, str]:
        """The ids of the result files: these, unless an earlier try chose some."""
        key = self._keys.batch(batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "output_file", output_id)
            pipe.hsetnx(key, "error_file", error_id)
            pipe.hmget(key, ["output_file", "error_file"])
            *_, (out, err) = await pipe.execute()
        return out.decode(), err.decode()

    async def record(self, batch_id: str, results: list[LineResult]) -> None:
        """Store each result unless its line has one (the workers' script)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for result in results:
                pipe.eval(*record_args(self._keys, batch_id, result))
            await pipe.execute()

    async def results(self, batch_id: str, indices: list[int]) -> list[LineResult | None]:
        raws = await self._redis.hmget(self._keys.batch_results(batch_id), indices)
        return [LineResult.model_validate_json(raw) if raw is not None else None for raw in raws]

    async def take_lease(self, batch_id: str, holder: str, ms: int) -> bool:
        return bool(await self._redis.set(self._keys.batch_lease(batch_id), holder, nx=True, px=ms))

    async def renew_lease(self, batch_id: str, holder: str, ms: int) -> bool:
        return bool(await self._redis.eval(_RENEW, 1, self._keys.batch_lease(batch_id), holder, str(ms)))  # type: ignore[misc]

    async def release_lease(self, batch_id: str, holder: str) -> None:
        await self._redis.eval(_RELEASE, 1, self._keys.batch_lease(batch_id), holder)  # type: ignore[misc]


def _object(batch: Batch) -> str:
    return batch.model_dump_json(exclude={"request_counts"})


def _state(raw: list[Any]) -> BatchState | None:
    obj, total, completed, failed, enqueued, finalize_as = raw
    if obj is None:
        return None
    batch = Batch.model_validate_json(obj)
    batch.request_counts = RequestCounts(total=_int(total), completed=_int(completed), failed=_int(failed))
    return BatchState(batch=batch, enqueued=_int(enqueued), finalize_as=finalize_as.decode() if finalize_as else None)
