"""Which queues a worker takes from as LoRA adapters come and go
(``worker/intake.py``), against a real Redis, with a stand-in for Celery's
consumer that records what it was told (a pure unit test of the rule): a
queue is left only after its grace and once empty, and an adapter evicted,
loaded again and evicted again gets a whole grace the second time."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from worker import intake
from worker.intake import Intake


class Consumer:
    """What Celery's consumer is asked: add_task_queue, cancel_task_queue."""

    def __init__(self) -> None:
        self.task_consumer = object()
        self.taking: set[str] = set()
        amqp = type("Amqp", (), {"queues": type("Queues", (), {"select_add": lambda self, name: name})()})()
        self.app: Any = type("App", (), {"amqp": amqp})()

    def add_task_queue(self, name: str) -> None:
        self.taking.add(name)

    def cancel_task_queue(self, name: str) -> None:
        self.taking.discard(name)


def test_a_queue_is_left_after_its_grace_once_empty_and_each_leave_gets_a_whole_grace(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = redis.Redis.from_url(redis_url)
    now = [100.0]
    monkeypatch.setattr(intake.time, "monotonic", lambda: now[0])
    wanted = {"llmq.base"}
    gate = Intake(r, lambda: sorted(wanted), grace_s=2.0)
    consumer = Consumer()
    consumer.taking = set(wanted)

    wanted.add("llmq.alpha")  # alpha loaded into a slot
    gate.apply(consumer)
    assert consumer.taking == {"llmq.base", "llmq.alpha"}
    wanted.discard("llmq.alpha")  # evicted: taken a while longer
    gate.apply(consumer)
    now[0] += 1.5
    gate.apply(consumer)
    assert "llmq.alpha" in consumer.taking
    wanted.add("llmq.alpha")  # loaded again within the grace
    now[0] += 0.2
    gate.apply(consumer)
    now[0] += 10.0  # long after the first grace would have ended
    wanted.discard("llmq.alpha")  # evicted again: a whole grace from now
    gate.apply(consumer)
    assert "llmq.alpha" in consumer.taking
    r.lpush("llmq.alpha", b"a job sent from a heartbeat that still showed alpha")
    now[0] += 2.5
    gate.apply(consumer)
    assert "llmq.alpha" in consumer.taking  # past the grace, but a job waits in it
    r.delete("llmq.alpha")
    now[0] += 1.1
    gate.apply(consumer)
    assert consumer.taking == {"llmq.base"}
