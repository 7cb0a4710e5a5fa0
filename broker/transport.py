"""Kombu's Redis transports with one redis-py client per connection pool.

Kombu's Redis channel builds a new ``redis.Redis`` for every command it sends
outside its event loop: each publish (a job sent by the API, each Celery task
event a worker sends for Flower) and each message a worker takes and
acknowledges (the unacked index). redis-py's constructor copies its table of
~200 response callbacks, so that was 15% of a synthetic worker's CPU and
3% of the API's. A client is only a pool and that table, and is safe to
share between threads (each command takes a connection from the pool), so
one per pool does: a pool kombu replaces (after a fork, a lost connection)
gets a new client.

This overrides kombu's ``Channel._create_client``, which kombu has no public
hook for. Tested with kombu 5.6 (the bound in ``pyproject.toml``);
``tests/test_pinned_internals.py`` fails if its signature changes or a
channel's commands stop going through it.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class _OneClientPerPool:
    pool: Any
    async_pool: Any
    Client: Any

    def _create_client(self, asynchronous: bool = False) -> Any:
        pool = self.async_pool if asynchronous else self.pool
        clients: dict[bool, Any] = self.__dict__.setdefault("_llmq_clients", {})
        client = clients.get(asynchronous)
        if client is None or client.connection_pool is not pool:
            client = clients[asynchronous] = self.Client(connection_pool=pool)
        return client


class Channel(_OneClientPerPool, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_OneClientPerPool, kombu_redis.SentinelChannel):
    pass


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_name(sentinel: bool) -> str:
    """What Celery's ``broker_transport`` names: it wins over the URL's scheme."""
    return f"{__name__}:{'SentinelTransport' if sentinel else 'Transport'}"
