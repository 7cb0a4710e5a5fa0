"""Wake Celery's consumer loop the moment a thread frees up.

With prefetch disabled, kombu asks Redis for the next job (a BRPOP) only
on a turn of the consumer's event loop (kombu's hub), and only while a
thread is free. A thread that finishes a job does not wake that loop: it
slept until its next timer. A fast timer while every thread was busy
bounded the wait, but cost a hundred wake-ups a second, a third of the
worker's CPU per token beside a llama.cpp server (~40 µs a token at 16
clients), and still a few milliseconds of queue time per job.

So the pool's completion callback, which runs on the task's thread right
after Celery has released the thread (``task_ready``) and acknowledged
the job, writes a byte to a pipe the hub watches. The loop's next turn
then finds a free thread and asks for the next job at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


class HubWaker:
    """A self-pipe on kombu's hub; ``wake()`` may be called from any thread."""

    def __init__(self, hub: Any, on_wake: Callable[[], None]) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._on_wake = on_wake
        hub.add_reader(self._read, self._drain)

    def wake(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop has wake-ups pending already

    def _drain(self, *_: Any) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        self._on_wake()


def wake_after_each_job(pool: Any, waker: HubWaker) -> None:
    """Wrap the pool's ``on_apply`` so that every job's completion callback
    (Celery's ``Request.on_success``: the thread is released, the message
    acknowledged) ends with ``waker.wake()``. Celery's threads pool calls
    it on the task's own thread; ``BasePool.apply_async`` passes it as the
    ``callback`` keyword."""
    on_apply = pool.on_apply

    def on_apply_waking(*args: Any, callback: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        def done(*a: Any, **kw: Any) -> Any:
            try:
                return callback(*a, **kw) if callback is not None else None
            finally:
                waker.wake()

        return on_apply(*args, callback=done, **kwargs)

    pool.on_apply = on_apply_waking
