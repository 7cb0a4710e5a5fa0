"""Which queues a worker's Celery consumer takes jobs from, as they change
while it runs: a LoRA adapter's queue while the worker holds the adapter in
a slot (``Runtime.queues``), adapters served or no longer served
(``worker/adapters.py``). Applied on Celery's consumer thread at each gate
tick (``worker/bootstep.py``) with Celery's public
``add_task_queue``/``cancel_task_queue``, which its remote control's
add_consumer/cancel_consumer use too.

A queue is left only after a grace and once it is empty: the API chose it
from a heartbeat up to a beat and a registry cache old, and a job already in
it must not wait there for nobody. Meanwhile its jobs still run here (an
adapter evicted is loaded again) or, for an adapter no longer served, end at
once with a 404.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from broker.keys import priority_lists

log = logging.getLogger("llmq.worker.intake")

LOOK_EVERY_S = 1.0  # how often Redis is asked whether a queue being left is empty


class Intake:
    def __init__(self, r: redis.Redis, wanted: Callable[[], list[str]], grace_s: float) -> None:
        self._redis = r
        self._wanted = wanted
        self._grace_s = grace_s
        self._consumed = set(wanted())  # selected by the bootstep before Celery consumes
        self._leaving: dict[str, float] = {}  # queue -> taken at least until (monotonic)
        self._looked_at: dict[str, float] = {}

    def apply(self, consumer: Any) -> None:
        if getattr(consumer, "task_consumer", None) is None:  # not connected yet
            return
        now = time.monotonic()
        wanted = set(self._wanted())
        for name in wanted & self._leaving.keys():  # wanted again before it was left: a later leave starts anew
            del self._leaving[name]
        for name in self._consumed - wanted:
            until = self._leaving.setdefault(name, now + self._grace_s)
            if until > now or self._has_jobs(name, now):
                wanted.add(name)
            else:
                del self._leaving[name]
        for name in wanted - self._consumed:
            consumer.app.amqp.queues.select_add(name)  # as the bootstep selects the others (again: left once)
            consumer.add_task_queue(name)
        for name in self._consumed - wanted:
            consumer.cancel_task_queue(name)
        if wanted != self._consumed:
            log.debug("taking from %s", ", ".join(sorted(wanted)))
        self._consumed = wanted

    def _has_jobs(self, queue: str, now: float) -> bool:
        if now - self._looked_at.get(queue, 0.0) < LOOK_EVERY_S:
            return True
        self._looked_at[queue] = now
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for name in priority_lists(queue):
                    pipe.llen(name)
                return any(pipe.execute())
        except redis.RedisError:
            return True  # stay until Redis can say
