"""The worker's heartbeat: the registry entry the API reads. A plain thread
that announces every ``interval`` and withdraws on a clean stop; ``tick``
runs after each beat (the held messages' own heartbeat, worker/redelivery.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from broker.keys import Keys
from broker.registry import announce, withdraw
from broker.schemas import Heartbeat

log = logging.getLogger("llmq.worker.heartbeat")


class Heart:
    def __init__(self, r: redis.Redis, keys: Keys, beat: Callable[[], Heartbeat], interval_s: float, ttl_ms: int,
                 tick: Callable[[], None] | None = None) -> None:
        self._redis = r
        self._keys = keys
        self._beat = beat
        self._interval = interval_s
        self._ttl_ms = ttl_ms
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmq-heart", daemon=True)
        self._worker_id = ""

    def start(self) -> None:
        first = self._beat()
        self._worker_id = first.worker_id
        announce(self._redis, self._keys, first, self._ttl_ms)  # fail loudly if Redis is unreachable at start
        self._thread.start()

    def stop(self) -> None:
        """Withdraw; safe to call twice (the watchdog and the shutdown both may)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            withdraw(self._redis, self._keys, self._worker_id)
        except redis.RedisError as exc:
            log.warning("could not withdraw %s from the registry: %s", self._worker_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                announce(self._redis, self._keys, self._beat(), self._ttl_ms)
                if self._tick is not None:
                    self._tick()
            except Exception as exc:  # redis-py's and kombu's connection errors alike; the next beat retries
                log.warning("heartbeat failed (%s); retrying in %.1f s", exc, self._interval)
