"""The one Celery task: run a generation job. The runtime (models, engines)
is built by the bootstep in ``worker/bootstep.py`` and hangs on the app."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.worker.request import Request

from broker.celery_app import GENERATE_TASK
from broker.schemas import Job
from worker.batchgate import BatchGate
from worker.redelivery import Redelivery


class HeldRequest(Request):  # type: ignore[misc]
    """Celery's request for one message, which also tells the worker's
    ``Redelivery`` that the message is held until it is acknowledged, and
    its ``BatchGate`` what kind of job holds a thread (created on Celery's
    consumer thread, which alone may pause the batch queues)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        redelivery(self.app).hold(self.message.delivery_tag)
        self._batch = bool((self.kwargs or {}).get("job", {}).get("batch"))
        gate = batch_gate(self.app)
        if gate is not None:
            gate.held(self._batch)
            gate.apply()
        self._released = False

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        redelivery(self.app).release(self.message.delivery_tag)
        gate = batch_gate(self.app)
        if gate is not None:
            gate.released(self._batch)

    def acknowledge(self) -> None:
        self._release()
        super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        self._release()
        super().reject(requeue)


def redelivery(app: Celery) -> Redelivery:
    return app.llmq_redelivery  # type: ignore[attr-defined, no-any-return]


def batch_gate(app: Celery) -> BatchGate | None:
    runtime = getattr(app, "llmq_runtime", None)
    return runtime.gate if runtime is not None else None


def register(app: Celery) -> None:
    app.llmq_redelivery = Redelivery(app)  # type: ignore[attr-defined]

    @app.task(name=GENERATE_TASK, bind=True, Request=HeldRequest)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, object]:
        runtime = self.app.llmq_runtime  # set by LLMQStep before any job is consumed
        return runtime.run(Job.model_validate(job))  # type: ignore[no-any-return]
