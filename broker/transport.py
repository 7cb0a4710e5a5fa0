"""Kombu's Redis transports with one redis-py client per connection pool,
and fair share between API keys under kombu's own lists.

Kombu's Redis channel builds a new ``redis.Redis`` for every command it sends
outside its event loop: each publish (a job sent by the API, each Celery task
event a worker sends for Flower) and each message a worker takes and
acknowledges (the unacked index). redis-py's constructor copies its table of
~200 response callbacks, so that was 15% of a synthetic worker's CPU and
3% of the API's. A client is only a pool and that table, and is safe to
share between threads (each command takes a connection from the pool), so
one per pool does: a pool kombu replaces (after a fork, a lost connection)
gets a new client.

Fair share (``broker/fairness.py``): a message with llmq's fair-share
header bound for a model's interactive queue goes into its tenant's list,
and a ticket into kombu's list in its place (``_put``); a ticket a worker
takes, by ``BRPOP`` or ``RPOP``, becomes the next message by fair share
(``_brpop_read``, ``_get``); purging a queue purges its tenants' lists.

These override kombu's ``Channel._create_client``, ``_put``, ``_brpop_read``,
``_get`` and ``_purge``, which kombu has no public hook for. Tested with
kombu 5.6 (the bound in ``pyproject.toml``); ``tests/test_pinned_internals.py``
fails if their signatures change or a channel's commands stop going through
them.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from broker import fairness
from broker.keys import Keys

# The broker transport option that names llmq's key prefix (make_celery sets it).
KEY_PREFIX_OPTION = "llmq_key_prefix"


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


class _FairQueues:
    """Fair share between tenants in a model's queue (``broker/fairness.py``)."""

    connection: Any
    client: Any
    sep: str
    priority_steps: list[int]
    connection_errors: tuple[type[BaseException], ...]
    _queue_cycle: Any
    _in_poll: Any

    _create_client: Any
    _q_for_pri: Any
    _get_message_priority: Any
    conn_or_acquire: Any

    @property
    def _llmq_keys(self) -> Keys:
        keys: Keys | None = self.__dict__.get("_llmq_keys_")
        if keys is None:
            prefix = self.connection.client.transport_options.get(KEY_PREFIX_OPTION, "llmq:")
            keys = self.__dict__["_llmq_keys_"] = Keys(prefix)
        return keys

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        fair = (message.get("headers") or {}).get(fairness.HEADER)
        if fair is None or not fairness.is_fair_queue(queue):
            super()._put(queue, message, **kwargs)  # type: ignore[misc]
            return
        list_name = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            fairness.push(client, self._llmq_keys, list_name, dumps(message), fair)

    def _take(self, list_name: str, item: bytes) -> bytes | None:
        """What a worker took from ``list_name``: a message, or a ticket for one."""
        if item != fairness.TICKET:
            return item
        return fairness.pop(self._create_client(), self._llmq_keys, list_name)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own, with a ticket turned into its message before delivery.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            list_name = bytes_to_str(dest)
            message = self._take(list_name, item)
            if message is None:  # a ticket whose message is gone (its queue was purged)
                raise Empty()
            queue = list_name.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self.connection._deliver(loads(bytes_to_str(message)), queue)
            return True
        finally:
            self._in_poll = None

    def _get(self, queue: str) -> Any:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                list_name = self._q_for_pri(queue, pri)
                while (item := client.rpop(list_name)) is not None:
                    message = self._take(list_name, item)
                    if message is not None:
                        return loads(bytes_to_str(message))
            raise Empty()

    def _purge(self, queue: str) -> int:
        purged: int = super()._purge(queue)  # type: ignore[misc]
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                for key in client.scan_iter(match=self._llmq_keys.fair_pattern(self._q_for_pri(queue, pri))):
                    client.delete(key)
        return purged


class Channel(_OneClientPerPool, _FairQueues, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_OneClientPerPool, _FairQueues, kombu_redis.SentinelChannel):
    pass


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_name(sentinel: bool) -> str:
    """What Celery's ``broker_transport`` names: it wins over the URL's scheme."""
    return f"{__name__}:{'SentinelTransport' if sentinel else 'Transport'}"


def _take_kombus_schemes() -> None:
    """A Sentinel broker is a list of URLs. When the connection is lost,
    Celery's reconnect switches to the next one, and kombu then takes the
    transport from that URL's scheme, not from ``broker_transport``: the
    worker came back on kombu's own channel, which reads a fair-share ticket
    as a broken message and stops the worker. So in an llmq process the
    schemes themselves name llmq's transports (``TRANSPORT_ALIASES`` is
    kombu's table of them; ``tests/test_pinned_internals.py`` checks a
    switch lands here)."""
    TRANSPORT_ALIASES.update({"redis": transport_name(False), "rediss": transport_name(False),
                              "sentinel": transport_name(True)})


_take_kombus_schemes()
