"""Entry point for ``celery -A worker.app worker --model-path ...``.

``create_app(settings)`` wires a worker's Celery app. Celery's ``-A`` reads
this module's ``app`` and takes no factory, so ``app`` is built on that
first read (a module ``__getattr__``) from the ``LLMQ_*`` environment, once
per process: importing the module builds no Settings."""

from __future__ import annotations

from functools import cache

from celery import Celery

from broker.celery_app import make_celery
from broker.settings import Settings
from worker import bootstep, tasks


def create_app(settings: Settings) -> Celery:
    app = make_celery(settings, main="llmq-worker")
    # Celery's consumer, reconnecting at the pauses of the transport options (worker/consumer.py).
    app.conf.worker_consumer = "worker.consumer:Consumer"
    tasks.register(app)
    bootstep.install(app, settings)
    return app


@cache
def _from_environment() -> Celery:
    return create_app(Settings())


def __getattr__(name: str) -> Celery:
    if name == "app":
        return _from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
