"""Every Redis connection an llmq process makes, from one place: to the
server at ``LLMQ_REDIS_URL``, or, when ``LLMQ_REDIS_SENTINELS`` lists
Sentinels, to whichever server they name the primary of
``LLMQ_REDIS_SENTINEL_MASTER``.

Through Sentinel every client asks for the primary when it connects, so
after a failover the next connection (a retried command, a resubscribed
pub/sub listener, kombu's reconnect) reaches the new primary: no llmq
process needs a restart. The database number and password still come from
``LLMQ_REDIS_URL``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from broker.settings import Settings

# A Sentinel answers within this, or the next one is asked.
SENTINEL_TIMEOUT_S = 1.0
HEALTH_CHECK_S = 30
# Pauses between kombu's rounds of attempts to reach a lost broker (the
# worker's consumer: worker/consumer.py; the senders' default channel): 0.2 s,
# then 0.2 s longer each round, at most 1 s. A Sentinel failover takes one to
# three seconds, so a worker is back within a second of the promotion, where
# kombu's own 2, 4, 6... s pauses made it 6 s or more.
RECONNECT_PAUSES = {"interval_start": 0.2, "interval_step": 0.2, "interval_max": 1.0}


def _db_and_password(settings: Settings) -> tuple[int, str | None]:
    url = urlparse(settings.redis_url)
    db = int(url.path.lstrip("/") or 0)
    return db, url.password


def _sentinels(settings: Settings) -> list[tuple[str, int]]:
    out = []
    for item in settings.redis_sentinels:
        host, _, port = item.rpartition(":")
        out.append((host or item, int(port or 26379)))
    return out


def sync_redis(settings: Settings) -> redis.Redis:
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, health_check_interval=HEALTH_CHECK_S)
    db, password = _db_and_password(settings)
    # The timeout in sentinel_kwargs only: as a plain keyword it would also
    # apply to the primary's connections and end every blocking pub/sub read.
    sentinel = Sentinel(_sentinels(settings), sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT_S})
    return sentinel.master_for(settings.redis_sentinel_master, db=db, password=password,
                               health_check_interval=HEALTH_CHECK_S)


def async_redis(settings: Settings, max_connections: int, timeout_s: float) -> aioredis.Redis:
    """The API's client. Plain Redis: a blocking pool, so a flood waits for a
    connection rather than failing. Sentinel's pool has no blocking variant:
    ``max_connections`` caps it."""
    if not settings.redis_sentinels:
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=max_connections,
                                                        timeout=timeout_s)
        return aioredis.Redis(connection_pool=pool)
    db, password = _db_and_password(settings)
    sentinel = AsyncSentinel(_sentinels(settings), sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT_S})
    return sentinel.master_for(settings.redis_sentinel_master, db=db, password=password,
                               max_connections=max_connections)


def celery_broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs (kombu's
    ``sentinel://`` transport takes the master's name there)."""
    if not settings.redis_sentinels:
        return settings.redis_url, dict(RECONNECT_PAUSES)
    db, password = _db_and_password(settings)
    auth = f":{password}@" if password else ""
    url = ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in _sentinels(settings))
    return url, {"master_name": settings.redis_sentinel_master,
                 "sentinel_kwargs": {"socket_timeout": SENTINEL_TIMEOUT_S}, **RECONNECT_PAUSES}
