"""How many batch lines a worker takes: only what interactive work leaves.

Batch lines wait on a queue of their own per model (``batch_queue_name``)
at kombu's lowest priority step, so a worker asked for its next job always
gets a waiting interactive job first. That alone is not enough: a worker
whose threads are all busy with batch lines makes the next interactive job
wait for one of them to end (seconds). So a worker consumes its batch
queues only while it has room for batch work:

    room = threads - reserve - interactive - batch lines held

``interactive`` is the most interactive jobs the worker held at once in the
last ``MEMORY_S`` seconds, not only now: a client that sent its next request
a few milliseconds after its last answer still finds its thread free.
``reserve`` threads stay free for interactive jobs that arrive at an idle
worker, but never all of them: a worker of one or two threads still runs
batch lines in one. Batch lines never stop once started: they end in seconds.

Counts change on Celery's threads (a job received, acknowledged); the
consumer is touched only from Celery's consumer thread (``apply``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("llmq.worker.batchgate")

MEMORY_S = 5.0


class BatchGate:
    def __init__(self, queues: list[str], threads: int, reserve: int) -> None:
        self.queues = queues
        self.threads = threads
        self.reserve = max(0, min(reserve, threads - 1))
        self._lock = threading.Lock()
        self._batch = 0
        self._interactive = 0
        self._peak = 0
        self._peak_at = 0.0
        self._consumer: Any = None
        self._listed = set(queues)

    def held(self, batch: bool) -> None:
        with self._lock:
            if batch:
                self._batch += 1
            else:
                self._interactive += 1
                self._note_peak()

    def released(self, batch: bool) -> None:
        with self._lock:
            if batch:
                self._batch -= 1
            else:
                self._interactive -= 1
                self._note_peak()

    def _note_peak(self) -> None:
        now = time.monotonic()
        if self._interactive >= self._peak or now - self._peak_at > MEMORY_S:
            self._peak, self._peak_at = self._interactive, now

    def room(self) -> int:
        with self._lock:
            self._note_peak()
            return self.threads - self.reserve - max(self._peak, self._interactive) - self._batch

    def apply(self, consumer: Any = None) -> None:
        """Consumer thread only: take from the batch queues iff there is room.

        ``consumer.task_consumer`` is one of the consumer attributes Celery's
        bootsteps guide documents (the kombu Consumer of task messages), and
        ``consuming_from``/``add_queue``/``consume``/``cancel_by_queue`` are
        kombu's public Consumer API, ``cancel_task_queue`` Celery's: no
        private use here. ``queues`` may change (LoRA adapters come and go):
        a queue no longer listed is left for good."""
        if consumer is not None:
            self._consumer = consumer
        tasks = getattr(self._consumer, "task_consumer", None)
        if tasks is None:
            return
        queues = list(self.queues)
        for name in self._listed - set(queues):
            self._consumer.cancel_task_queue(name)
        self._listed = set(queues)
        want = self.room() > 0
        # Asked of kombu each time: after a reconnection Celery consumes every selected queue again.
        changed = [name for name in queues if tasks.consuming_from(name) != want]
        if not changed:
            return
        for name in changed:
            if want:
                tasks.add_queue(self._consumer.app.amqp.queues.select_add(name))
            else:
                tasks.cancel_by_queue(name)
        if want:
            tasks.consume()
        log.debug("batch queues %s %s", ", ".join(changed), "resumed" if want else "paused")
