"""The worker's Celery consumer: Celery's own, reconnecting to a lost broker
at the pace set in ``broker_transport_options`` rather than at kombu's
defaults.

Celery's consumer re-establishes a lost broker connection through kombu's
``Connection.ensure_connection`` and passes it no pauses, so kombu's apply:
after each round of the broker URLs, 2 s, then 4, 6... up to 30 s. The first
round runs the moment Redis is lost, while Sentinel needs one to three
seconds to promote a replica (``down-after-milliseconds``, then an
election), so the round at 2 s mostly came just before the promotion and a
worker took jobs again only at the next, 6 s after the primary died (12, 20
or 30 s when a promotion took a little longer). Kombu reads the pauses it
should use from the transport options (``interval_start``,
``interval_step``, ``interval_max``: its ``default_channel`` does); this
consumer gives Celery's reconnect the same ones (``broker/connections.py``
sets them).

Celery's ``worker_consumer`` setting names this class. It relies on
``Consumer.ensure_connected`` calling ``conn.ensure_connection`` without
pauses of its own, as Celery 5.6 does (pinned in ``pyproject.toml``);
``tests/test_reconnect.py`` fails if that changes.
"""

from __future__ import annotations

import functools

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection

PAUSE_OPTIONS = ("interval_start", "interval_step", "interval_max")


class Consumer(CeleryConsumer):
    def ensure_connected(self, conn: Connection) -> Connection:
        pauses = {k: conn.transport_options[k] for k in PAUSE_OPTIONS if k in conn.transport_options}
        # On this connection object only: Celery makes a new one for each reconnect.
        conn.ensure_connection = functools.partial(conn.ensure_connection, **pauses)
        return super().ensure_connected(conn)
