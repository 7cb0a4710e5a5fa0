"""The one Celery task: run a generation job. The runtime (models, engines)
is built by the bootstep in ``worker/bootstep.py`` and hangs on the app."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from broker.celery_app import GENERATE_TASK
from broker.schemas import Job


def register(app: Celery) -> None:
    @app.task(name=GENERATE_TASK, bind=True)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, object]:
        runtime = self.app.llmq_runtime  # set by LLMQStep before any job is consumed
        return runtime.run(Job.model_validate(job))  # type: ignore[no-any-return]
