"""Where kombu's Redis transport keeps a queue's waiting messages: one list
per priority step. ``/metrics``' waiting count (``api/metrics.py``) reads those
lists by the names ``broker/keys.py`` builds; this checks them against a real
Redis that Celery sent to, at every priority llmq uses."""

from __future__ import annotations

from pathlib import Path

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from broker.keys import KOMBU_PRIORITY_SEP, KOMBU_PRIORITY_STEPS, priority_lists
from broker.schemas import BATCH_PRIORITY, DEFAULT_PRIORITY
from tests.procs import start_redis


def test_the_layout_is_kombus() -> None:
    assert kombu_redis.Channel.sep == KOMBU_PRIORITY_SEP
    assert tuple(kombu_redis.PRIORITY_STEPS) == KOMBU_PRIORITY_STEPS


def test_every_waiting_message_is_in_one_of_the_lists(tmp_path: Path) -> None:
    proc, port = start_redis(tmp_path)
    try:
        app = Celery("layout", broker=f"redis://127.0.0.1:{port}/0")
        priorities = [0, 3, DEFAULT_PRIORITY, 9, BATCH_PRIORITY]
        for i, priority in enumerate(priorities):
            app.send_task("llmq.layout", queue="llmq.m", priority=priority, task_id=f"t{i}")
        r = redis.Redis(port=port)
        lengths = [r.llen(key) for key in priority_lists("llmq.m")]
        assert sum(lengths) == len(priorities), (lengths, sorted(r.keys()))
        # Step 0 is the queue's own name; the default tier is not step 0, so LLEN of that name alone undercounts.
        assert 1 <= lengths[0] < len(priorities), lengths
    finally:
        proc.kill()
