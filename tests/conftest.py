"""Fixtures for end-to-end tests: one real stack per test session (Redis on
a free port, the API, one Celery worker with the demo model), with short
heartbeats so registry changes show within seconds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import DEMO_MODEL, DEMO_MODEL_DIR, Proc, start_api, start_redis, start_worker, wait_model

# The `browser` fixture (headless Chromium) for the page tests.
pytest_plugins = ["tests.browser"]

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TTL_S = 2.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test of an ``*_e2e.py`` file, and every test that uses the
    stack, is ``e2e``, marked or not: ``-m "not e2e"`` must never start the
    stack (three such files once lacked the mark, and the fast run started
    the whole stack for them)."""
    for item in items:
        if item.path.name.endswith("_e2e.py") or "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the test module's own, with nothing else attached."""
    proc, port = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@dataclass
class Stack:
    redis_url: str
    env: dict[str, str]
    base_url: str  # http://127.0.0.1:PORT
    api: Proc
    worker: Proc
    model: str = DEMO_MODEL

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"{DEMO_MODEL_DIR} is missing: run `make test` (it builds the demo model) or `llmq demo-model`")
    redis, port = start_redis(Path(tmp_path_factory.mktemp("redis")))
    redis_url = f"redis://127.0.0.1:{port}/0"
    env = {
        "LLMQ_REDIS_URL": redis_url,
        "LLMQ_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S),
        "LLMQ_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
        "LLMQ_REGISTRY_CACHE_S": "0.2",
    }
    api, base = start_api(env)
    worker = start_worker(env, "worker-main")
    try:
        wait_model(base, DEMO_MODEL, worker)
        yield Stack(redis_url=redis_url, env=env, base_url=base, api=api, worker=worker)
    finally:
        for proc in (worker, api, redis):
            proc.stop()
