"""The worker's Celery consumer reconnects to a lost broker at llmq's pauses
(worker/consumer.py), not kombu's 2, 4, 6... s: no Redis needed, a closed
port refuses every attempt."""

from __future__ import annotations

import time

import pytest
from kombu.exceptions import OperationalError
from kombu.utils.imports import symbol_by_name

from broker.celery_app import make_celery
from broker.connections import RECONNECT_PAUSES, celery_broker
from broker.settings import Settings
from tests.procs import free_port
from worker.app import create_app
from worker.consumer import Consumer


def test_the_broker_options_carry_the_pauses_with_or_without_sentinel() -> None:
    plain = Settings(redis_url="redis://127.0.0.1:6379/0")
    sentinel = Settings(redis_url="redis://127.0.0.1:6379/0", redis_sentinels=["127.0.0.1:26379"])
    for settings in (plain, sentinel):
        _, options = celery_broker(settings)
        assert RECONNECT_PAUSES.items() <= options.items()
        assert make_celery(settings).conf.broker_transport_options.items() >= RECONNECT_PAUSES.items()


def test_the_worker_reconnects_at_the_transport_options_pauses() -> None:
    """Celery's ``Consumer.ensure_connected`` (run on every reconnect) with
    three retries: 0.2 + 0.4 + 0.6 s of pauses here, 2 + 4 + 6 s with
    kombu's. This fails if Celery stops calling ``conn.ensure_connection``
    or starts passing pauses of its own (worker/consumer.py relies on both)."""
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    app.conf.broker_connection_max_retries = 3
    assert symbol_by_name(app.conf.worker_consumer) is Consumer
    consumer = Consumer.__new__(Consumer)  # only what ensure_connected reads
    consumer.app = app
    consumer.first_connection_attempt = False
    consumer.broker_connection_retry_attempt = 0
    started = time.monotonic()
    with pytest.raises(OperationalError):
        consumer.ensure_connected(app.connection_for_read())
    elapsed = time.monotonic() - started
    assert 1.1 < elapsed < 5, elapsed
