"""``celery -A tests.held_app worker``: llmq's worker app (``worker.app``)
holding at one moment of a job's life until it is killed, for the tests
that SIGKILL a worker there (``tests/holds.py``).

``worker.runtime``'s ``claim`` is wrapped: with ``LLMQ_TEST_HOLD_AT`` at
``before_claim`` the worker holds before claiming the job; at
``after_claim``, once it has claimed it (not when the claim is refused), so
before it publishes anything. Holding sets ``test:held:<point>`` to the
job's id, then blocks the job's thread for good."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import redis

from broker.control import Claim
from broker.keys import Keys
from tests.holds import HOLD_ENV, POINTS
from worker import runtime
from worker.app import app

__all__ = ["app"]

log = logging.getLogger("llmq.tests.held_app")

POINT = os.environ[HOLD_ENV]
assert POINT in POINTS, POINT
_claim = runtime.claim  # an AttributeError here: the runtime claims its jobs some other way now


def _hold(r: redis.Redis, keys: Keys, job_id: str) -> None:
    log.warning("job %s: holding at %s until killed (tests/held_app.py)", job_id, POINT)
    r.set(f"{keys.prefix}test:held:{POINT}", job_id, ex=600)
    threading.Event().wait()


def _held_claim(r: redis.Redis, keys: Keys, model: str, job_id: str, *args: Any, **kwargs: Any) -> Claim:
    if POINT == "before_claim":
        _hold(r, keys, job_id)
    got = _claim(r, keys, model, job_id, *args, **kwargs)
    if POINT == "after_claim" and got is not Claim.HELD:
        _hold(r, keys, job_id)
    return got


runtime.claim = _held_claim
