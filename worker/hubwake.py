"""Wake Celery's consumer loop the moment a thread frees up.

With prefetch disabled, kombu asks Redis for the next job (a BRPOP) only
on a turn of the consumer's event loop (kombu's hub), and only while a
thread is free. A thread that finishes a job does not wake that loop: it
slept until its next timer. A fast timer while every thread was busy
bounded the wait, but cost a hundred wake-ups a second, a third of the
worker's CPU per token beside a llama.cpp server (~40 µs a token at 16
clients), and still a few milliseconds of queue time per job.

So each job, once Celery has freed its thread (``task_ready``) and
acknowledged or rejected its message, writes a byte to a pipe the hub
watches (``worker/tasks.py``, on the task's thread). The loop's next turn
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
