"""A Celery app with llmq's broker settings and no tasks, for the tools
that only watch the queues: ``celery -A broker.app flower`` reaches Redis
the way every llmq process does, Sentinel included (broker/connections.py),
where ``celery --broker URL flower`` knows only a plain URL."""

from __future__ import annotations

from broker.celery_app import make_celery
from broker.settings import Settings

app = make_celery(Settings(), main="llmq-flower")
