"""The one Celery task (run a generation job), and the one place llmq reaches
into Celery's worker. The runtime (models, engines) is built by the bootstep
in ``worker/bootstep.py`` and hangs on the app.

A worker must know which messages it holds (taken, not yet acknowledged or
rejected), as they come and go:

- ``Redelivery`` re-scores them in kombu's unacked index on every heartbeat
  (``worker/redelivery.py``);
- the ``BatchGate`` counts the threads they hold (``worker/batchgate.py``);
- a message let go wakes the consumer loop, so kombu asks for the next job
  at once (``worker/hubwake.py``).

Taking one has a public hook, the ``task_received`` signal (on the consumer
thread, the only one that may pause the batch queues). Letting one go has
none: ``HeldRequest`` overrides ``acknowledge`` and ``reject``, public methods
of the request class a task may replace (``Task.Request``), which Celery
calls on the task's thread right after it freed the thread (``task_ready``).
That order is Celery's, not a promise: tested with Celery 5.6 (the bounds in
``pyproject.toml``), and ``tests/test_pinned_internals.py`` fails if it
changes.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, signals
from celery.worker.request import Request

from broker.celery_app import GENERATE_TASK
from broker.schemas import Job
from worker.batchgate import BatchGate
from worker.hubwake import HubWaker
from worker.redelivery import Redelivery


class HeldRequest(Request):  # type: ignore[misc]
    """Celery's request for one message, which lets go of it (see above)."""

    _held = False
    _batch = False

    def hold(self) -> None:
        """Consumer thread, before the job runs."""
        self._held = True
        self._batch = bool((self.kwargs or {}).get("job", {}).get("batch"))
        redelivery(self.app).hold(self.message.delivery_tag)
        gate = batch_gate(self.app)
        if gate is not None:
            gate.held(self._batch)
            gate.apply()

    def _let_go(self) -> None:
        if not self._held:
            return  # revoked on receipt, or let go already
        self._held = False
        redelivery(self.app).release(self.message.delivery_tag)
        gate = batch_gate(self.app)
        if gate is not None:
            gate.released(self._batch)

    def acknowledge(self) -> None:
        self._let_go()
        super().acknowledge()
        _wake(self.app)

    def reject(self, requeue: bool = False) -> None:
        self._let_go()
        super().reject(requeue)
        _wake(self.app)


def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if isinstance(request, HeldRequest):
        request.hold()


def redelivery(app: Celery) -> Redelivery:
    return app.llmq_redelivery  # type: ignore[attr-defined, no-any-return]


def batch_gate(app: Celery) -> BatchGate | None:
    runtime = getattr(app, "llmq_runtime", None)
    return runtime.gate if runtime is not None else None


def wake_after_each_job(app: Celery, waker: HubWaker) -> None:
    """Every message the worker lets go, once its thread is free, ends with
    ``waker.wake()`` (called by the bootstep once kombu's hub exists)."""
    app.llmq_waker = waker  # type: ignore[attr-defined]


def _wake(app: Celery) -> None:
    waker: HubWaker | None = getattr(app, "llmq_waker", None)
    if waker is not None:
        waker.wake()


def register(app: Celery) -> None:
    app.llmq_redelivery = Redelivery(app)  # type: ignore[attr-defined]
    signals.task_received.connect(_on_received, dispatch_uid="llmq.hold", weak=False)

    @app.task(name=GENERATE_TASK, bind=True, Request=HeldRequest)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, object]:
        runtime = self.app.llmq_runtime  # set by LLMQStep before any job is consumed
        return runtime.run(Job.model_validate(job))  # type: ignore[no-any-return]
