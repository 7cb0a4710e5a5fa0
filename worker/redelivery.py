"""Messages a worker dies holding go back to the queue within about one
heartbeat TTL, not kombu's default hour.

Kombu's Redis transport keeps every message a worker has taken and not yet
acknowledged in a sorted set (``unacked_index``) scored by when it was taken,
and puts back those older than the visibility timeout. llmq sets that timeout
just past the heartbeat TTL (``broker/celery_app.py``) and each worker, on
every heartbeat:

- re-scores the messages it holds (``hold``/``release`` are called as Celery
  takes and lets go of each, ``worker/tasks.py``), so a live worker's jobs
  never look abandoned however long they run;
- runs kombu's own restore of the messages nobody re-scored: those of a
  worker that died. Kombu's consumer does this only every ~100 s.

A restored message is delivered again; the claim key decides whether it
runs again (``broker/control.py``).

Kombu has no public API for either: ``tick`` is where llmq touches its Redis
channel's internals (``unacked_index_key``, ``qos.restore_visible``); the
other place is ``broker/transport.py``.
Tested with kombu 5.6 (the bounds in ``pyproject.toml``);
``tests/test_pinned_internals.py`` checks both against a real Redis and fails
if kombu changes them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("llmq.worker.redelivery")

# Messages kombu puts back per heartbeat, at most.
RESTORE_BATCH = 100


class Redelivery:
    def __init__(self, app: Any) -> None:
        self._app = app
        self._held: set[Any] = set()
        self._lock = threading.Lock()
        self._conn: Any = None

    def hold(self, delivery_tag: Any) -> None:
        with self._lock:
            self._held.add(delivery_tag)

    def release(self, delivery_tag: Any) -> None:
        with self._lock:
            self._held.discard(delivery_tag)

    def tick(self) -> None:
        """Heartbeat thread only: kombu channels are not shared between threads."""
        if self._conn is None:
            self._conn = self._app.connection_for_write()
        try:
            channel = self._conn.default_channel
            with self._lock:
                held = list(self._held)
            if held:
                now = time.time()
                # XX: never re-add a message already acknowledged (or restored) meanwhile.
                channel.client.zadd(channel.unacked_index_key, {tag: now for tag in held}, xx=True)
            channel.qos.restore_visible(num=RESTORE_BATCH, interval=1)
        except Exception:
            self.close()  # a new connection at the next beat (Redis restarted, failed over)
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:
                log.debug("closing the broker connection failed", exc_info=True)
