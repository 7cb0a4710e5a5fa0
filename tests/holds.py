"""Holding a worker at one moment of a job's life, for the tests that
SIGKILL it there: before it claims the job, or after, before its first
event. The hold lives in the test-only app ``tests/held_app.py``, not in
the worker: ``start_held_worker`` runs ``celery -A tests.held_app worker``
with the command line ``llmq worker`` would run."""

from __future__ import annotations

from broker.settings import Settings
from cli.argv import worker_argv
from tests.procs import DEMO_MODEL_DIR, Proc, spawn

HOLD_ENV = "LLMQ_TEST_HOLD_AT"  # read by tests/held_app.py only
POINTS = ("before_claim", "after_claim")


def hold_key(point: str) -> str:
    """Set to the held job's id once the worker holds (the default key prefix)."""
    return f"llmq:test:held:{point}"


def start_held_worker(env: dict[str, str], name: str, point: str, model_names: str, concurrency: int) -> Proc:
    assert point in POINTS, point
    argv = worker_argv([str(DEMO_MODEL_DIR)], [model_names], concurrency, ["--hostname", f"{name}@%h"],
                       settings=Settings())
    argv[argv.index("worker.app")] = "tests.held_app"
    return spawn(name, argv, {**env, HOLD_ENV: point})
