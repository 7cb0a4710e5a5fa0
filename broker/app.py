"""A Celery app with llmq's broker settings and no tasks, for the tools
that only watch the queues: ``celery -A broker.app flower`` reaches Redis
the way every llmq process does, Sentinel included (broker/connections.py),
where ``celery --broker URL flower`` knows only a plain URL.

Celery's ``-A`` reads this module's ``app`` and takes no factory, so ``app``
is built on that first read (a module ``__getattr__``), from the ``LLMQ_*``
environment: importing the module builds no Settings."""

from __future__ import annotations

from functools import cache

from celery import Celery

from broker.celery_app import make_celery
from broker.settings import Settings


@cache
def _from_environment() -> Celery:
    return make_celery(Settings(), main="llmq-flower")


def __getattr__(name: str) -> Celery:
    if name == "app":
        return _from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
