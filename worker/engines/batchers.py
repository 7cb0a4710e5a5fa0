"""How an engine's updates reach its ``Emitter`` from the thread that makes
them: ``Pump`` (a thread of its own, for the transformers engine's step
thread) and ``LoopBatcher`` (on an asyncio loop, for the engines built on
``worker/engines/loop.py``)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from worker.engines.protocol import Update

log = logging.getLogger("llmq.worker.engines")

T = TypeVar("T")


class Pump(Generic[T]):
    """A thread that hands everything queued since its last round to
    ``handle`` at once: outputs of steps that piled up go out together."""

    def __init__(self, name: str, handle: Callable[[list[T]], None]) -> None:
        self._handle = handle
        self._queue: queue.Queue[list[T]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.busy_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def put(self, items: list[T]) -> None:
        self._queue.put(items)

    def stop(self) -> None:
        """Handle what is queued, then end. No thread of ours may outlive
        stop(): a daemon thread still in native code when the interpreter
        finalizes aborts the process."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            try:
                items = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            while True:
                try:
                    items.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            t = time.monotonic()
            try:
                self._handle(items)
            except Exception:  # one bad batch must not kill the pump
                log.exception("publishing %d outputs failed", len(items))
            self.busy_s += time.monotonic() - t


class LoopBatcher:
    """Updates made on an asyncio loop (the vLLM and llama.cpp engines),
    published from that loop: what arrived in one wake-up goes out in one
    pipeline, and no token pays a hand-off to another thread. (A pump
    thread cost this worker a third of its CPU per token, waking the thread
    and passing the GIL back and forth.)

    With ``sources``, the updates of one engine step are gathered even when
    they arrive over several wake-ups, as llama-server's do (each slot's
    stream is written by its own HTTP thread, after the step; at 16 clients
    a step's updates came over 2.4 ms at the median, 5.3 ms at p90, with
    ~45 ms between steps): a batch goes out once every source that is
    streaming has put an update since the last one, or when none came for
    ``QUIET_S``, or ``GATHER_S`` after its first update. Updates that follow
    a complete step (a new stream's first token, a last message) wait only
    for the quiet. One Redis message a step, not one per wake-up (7.6 a
    step at 16 clients), spares Redis and the API their wake-ups."""

    QUIET_S = 0.001
    GATHER_S = 0.005

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Callable[[list[Update]], None],
                 alone: Callable[[], bool] | None = None, sources: Callable[[], int] | None = None) -> None:
        self._loop = loop
        self._publish = publish
        self._alone = alone  # True while one source puts: nothing could join its updates
        self._sources = sources  # how many sources put an update each step
        self._pending: list[Update] = []
        self._from: set[int] = set()  # ids of the choices with updates pending
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None
        self._first_at = self._last_at = 0.0  # loop time of the pending batch's first and latest update

    def put(self, updates: list[Update]) -> None:
        """Loop thread only."""
        if self._scheduled is None and self._alone is not None and self._alone():
            self._pending = updates  # out now, without a turn of the loop to wait for company
            self._flush()
            return
        self._pending.extend(updates)
        if self._sources is None:
            if self._scheduled is None:
                self._scheduled = self._loop.call_soon(self._flush)
            return
        self._from.update(id(u.choice) for u in updates)
        self._last_at = self._loop.time()
        if len(self._from) >= self._sources():
            if self._scheduled is not None:
                self._scheduled.cancel()
            self._flush()
        elif self._scheduled is None:
            self._first_at = self._last_at
            self._scheduled = self._loop.call_at(self._last_at + self.QUIET_S, self._expire)

    def _expire(self) -> None:
        due = min(self._last_at + self.QUIET_S, self._first_at + self.GATHER_S)
        if self._loop.time() < due:  # more came meanwhile: wait for the quiet, up to GATHER_S in all
            self._scheduled = self._loop.call_at(due, self._expire)
        else:
            self._flush()

    def _flush(self) -> None:
        batch, self._pending, self._scheduled = self._pending, [], None
        self._from.clear()
        try:
            self._publish(batch)
        except Exception:  # one bad batch must not stop the loop
            log.exception("publishing %d outputs failed", len(batch))
