"""The model registry is nothing but worker heartbeats in Redis.

Workers write ``Heartbeat`` JSON under ``<prefix>worker:<id>`` with a TTL;
the API reads them (cached for about a second). A model is live while at
least one heartbeat lists it. Workers also record every model they ever
served in one hash, so the API can answer 503 (known, no live worker) rather
than 404 (never served).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from broker.keys import Keys
from broker.schemas import Heartbeat, ModelInfo


# ----------------------------------------------------------- worker side


def announce(r: redis.Redis, keys: Keys, beat: Heartbeat, ttl_ms: int) -> None:
    with r.pipeline(transaction=False) as pipe:
        pipe.set(keys.worker(beat.worker_id), beat.model_dump_json(), px=ttl_ms)
        for m in beat.models:
            pipe.hset(keys.models_seen(), m.name, m.model_dump_json())
        pipe.execute()


def withdraw(r: redis.Redis, keys: Keys, worker_id: str) -> None:
    r.delete(keys.worker(worker_id))


# -------------------------------------------------------------- API side


@dataclass
class LiveModel:
    info: ModelInfo
    workers: list[Heartbeat] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers)


class Registry:
    """Reads live workers from Redis, cached for ``cache_s`` seconds."""

    def __init__(self, r: aioredis.Redis, keys: Keys, cache_s: float = 1.0) -> None:
        self._redis = r
        self._keys = keys
        self._cache_s = cache_s
        self._cached_at = float("-inf")
        self._workers: list[Heartbeat] = []
        self._reading: asyncio.Future[list[Heartbeat]] | None = None

    async def workers(self) -> list[Heartbeat]:
        if time.monotonic() - self._cached_at <= self._cache_s:
            return self._workers
        # One read for every request that finds the cache stale: each read
        # awaits Redis, and 64 requests arriving together used to make 64
        # reads (a fifth of the API's CPU at short answers). Shielded: a
        # request cancelled while waiting must not cancel the others' read.
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._reading)

    async def _refresh(self) -> list[Heartbeat]:
        try:
            self._workers = await self._read_workers()
            self._cached_at = time.monotonic()
            return self._workers
        finally:
            self._reading = None

    async def _read_workers(self) -> list[Heartbeat]:
        names = [k async for k in self._redis.scan_iter(match=self._keys.worker_pattern(), count=500)]
        if not names:
            return []
        beats = []
        for raw in await self._redis.mget(names):
            if raw is not None:  # expired between SCAN and MGET
                beats.append(Heartbeat.model_validate_json(raw))
        return sorted(beats, key=lambda b: b.worker_id)

    async def live_models(self) -> dict[str, LiveModel]:
        models: dict[str, LiveModel] = {}
        for beat in await self.workers():
            for info in beat.models:
                models.setdefault(info.name, LiveModel(info=info)).workers.append(beat)
        return dict(sorted(models.items()))

    async def ever_served(self, model: str) -> bool:
        return bool(await self._redis.hexists(self._keys.models_seen(), model))

    async def last_announced(self, models: list[str]) -> dict[str, ModelInfo | None]:
        """What a worker last announced of each model, live or not (None:
        never served): batch lines are checked against it, since they may
        wait for a worker that is not up yet."""
        if not models:
            return {}
        raws = await self._redis.hmget(self._keys.models_seen(), models)
        return {m: ModelInfo.model_validate_json(raw) if raw is not None else None for m, raw in zip(models, raws)}
