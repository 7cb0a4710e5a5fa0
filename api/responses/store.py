"""Responses in Redis: each one's hash (``Keys.response``: the stored
request, ``StoredResponse``), its events stream (``Keys.response_events``:
the worker's events and the API's marks, from which it is rebuilt) and the
set of responses not yet ended (``Keys.responses_open``).

Both keys live ``responses_ttl_s``. A deleted response leaves a tombstone
(a hash without ``record``) for a minute while its keepers delete the
stream a late worker append may recreate.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from api.errors import APIError
from api.responses.events import API_FIELD, Entry, Mark
from api.responses.protocol import StoredResponse
from broker.keys import Keys
from broker.settings import Settings

RECORD = "record"  # the hash field of the stored request
ENDED = "ended"  # the hash field set once, by the keeper that counted the response's end
DELETED = "deleted"  # a tombstone's field
TOMBSTONE_S = 60
PAGE = 1000  # stream entries per read

# Append a mark (ARGV[2]) to a stream (KEYS[1]) only if its last entry is
# still ARGV[1] ("" appends in any case), so a keeper's decision, taken on
# the entries it read, cannot land after an entry it did not see.
_APPEND = """
if ARGV[1] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local id = '0-0'
  if #last > 0 then id = last[1][1] end
  if id ~= ARGV[1] then return false end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return id
"""
# Set a field (ARGV[1]) of a hash (KEYS[1]) only if the hash exists and lacks it.
_SET_ONCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) end
return 0
"""


def response_not_found(response_id: str, param: str = "response_id", code: str = "response_not_found") -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code=code)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ResponseStore:
    def __init__(self, r: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self._redis = r
        self._keys = keys
        self._ttl_s = settings.responses_ttl_s
        self._max_events = settings.responses_stream_max_events

    def __repr__(self) -> str:
        return f"ResponseStore(keys={self._keys!r}, ttl_s={self._ttl_s})"

    def stream_key(self, response_id: str) -> str:
        return self._keys.response_events(response_id)

    async def create(self, record: StoredResponse) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.response(record.id), RECORD, record.model_dump_json())
            pipe.expire(self._keys.response(record.id), self._ttl_s)
            pipe.sadd(self._keys.responses_open(), record.id)
            await pipe.execute()

    async def get(self, response_id: str) -> StoredResponse | None:
        """The stored request; None if there is none (never stored, expired or deleted)."""
        raw = await self._redis.hget(self._keys.response(response_id), RECORD)  # type: ignore[misc]
        return None if raw is None else StoredResponse.model_validate_json(raw)

    async def visible(self, response_id: str, param: str = "response_id", code: str = "response_not_found"
                      ) -> StoredResponse:
        """The stored request, or the 404 a client gets: a ``store: false`` response is never shown."""
        record = await self.get(response_id)
        if record is None or not record.store:
            raise response_not_found(response_id, param, code)
        return record

    async def entries(self, response_id: str, after: str = "0-0") -> list[Entry]:
        """Every entry after ``after``, in order."""
        out: list[Entry] = []
        while True:
            page = await self._redis.xrange(self.stream_key(response_id), f"({after}", "+", count=PAGE)
            out += [(_text(i), f) for i, f in page]
            if len(page) < PAGE:
                return out
            after = out[-1][0]

    async def append(self, response_id: str, mark: Mark, if_last: str | None = None) -> str | None:
        """Append the API's mark; with ``if_last``, only if the stream's last
        entry is still that one. Returns the entry's id, or None if not appended."""
        got = await self._redis.eval(  # type: ignore[misc]
            _APPEND, 1, self.stream_key(response_id), if_last or "", mark.model_dump_json(exclude_none=True),
            str(self._max_events), API_FIELD, str(self._ttl_s))
        return None if got is None else _text(got)

    async def mark_ended(self, response_id: str, status: str) -> bool:
        """True for the first caller only: that one counts the response's end."""
        key = self._keys.response(response_id)
        return bool(await self._redis.eval(_SET_ONCE, 1, key, ENDED, status))  # type: ignore[misc]

    async def delete(self, response_id: str) -> None:
        """Leave a tombstone; the keepers delete the stream while it lasts."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.response(response_id), self.stream_key(response_id))
            pipe.hset(self._keys.response(response_id), DELETED, "1")
            pipe.expire(self._keys.response(response_id), TOMBSTONE_S)
            pipe.sadd(self._keys.responses_open(), response_id)
            await pipe.execute()

    async def drop(self, response_id: str) -> None:
        """Delete its keys at once (a ``store: false`` response that ended)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.response(response_id), self.stream_key(response_id))
            pipe.srem(self._keys.responses_open(), response_id)
            await pipe.execute()

    # ---------------------------------------------------------- the keeper's view

    async def open_ids(self) -> list[str]:
        return sorted(_text(i) for i in await self._redis.smembers(self._keys.responses_open()))  # type: ignore[misc]

    async def close(self, response_id: str) -> None:
        await self._redis.srem(self._keys.responses_open(), response_id)  # type: ignore[misc]

    async def look(self, ids: list[str], after: Mapping[str, str]) -> list[tuple[bool, bool, list[Entry]]]:
        """For each id, in one round trip: whether its hash exists, whether
        it holds a record (not a tombstone), and its entries after ``after[id]``."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.exists(self._keys.response(i))
                pipe.hexists(self._keys.response(i), RECORD)
                pipe.xrange(self.stream_key(i), f"({after.get(i, '0-0')}", "+", count=PAGE)
            replies = await pipe.execute()
        out = []
        for n in range(len(ids)):
            exists, has_record, page = replies[3 * n: 3 * n + 3]
            out.append((bool(exists), bool(has_record), [(_text(e), f) for e, f in page]))
        return out

    async def delete_stream(self, response_id: str) -> None:
        await self._redis.delete(self.stream_key(response_id))
