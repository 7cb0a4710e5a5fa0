"""Entry point for ``celery -A worker.app worker --model-path ...``.

Settings are read once here, from ``LLMQ_*`` environment variables."""

from __future__ import annotations

from broker.celery_app import make_celery
from broker.settings import Settings
from worker import bootstep, tasks

settings = Settings()
app = make_celery(settings, main="llmq-worker")
tasks.register(app)
bootstep.install(app, settings)
