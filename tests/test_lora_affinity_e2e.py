"""LoRA adapter affinity with two real workers of the demo model, each
serving its four test adapters (``tests/loras.py``) with room for all four:
a job for an adapter goes to a worker that holds it, so each adapter is
loaded once, on one worker, whatever order the requests come in. Without
affinity, whichever worker asks first takes a job and loads its adapter if
it must: every adapter ends up loaded on both. The heartbeats say which
worker holds which adapter, and so does ``/metrics``."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.loras import PHRASES, build
from tests.procs import DEMO_MODEL, Proc, quick_env, start_api, start_redis, start_worker, wait_for, wait_model

pytestmark = pytest.mark.e2e

SETTLE_S = 1.5  # three heartbeats and a registry cache: every worker's slots are announced


@dataclass
class Fleet:
    base: str
    workers: list[Proc]

    def answer(self, model: str) -> str:
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                             temperature=0, max_tokens=12)
        return out.choices[0].message.content or ""

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=5).text

    def loads(self) -> dict[tuple[str, str], float]:
        """(adapter, worker) -> times that worker loaded it into a slot."""
        return {(m, w): float(v) for m, w, v in re.findall(
            r'^llmq:lora_loads\{model="([^"]+)",worker="([^"]+)"\} (\S+)$', self.metrics(), re.MULTILINE)}

    def holders(self) -> dict[str, set[str]]:
        """adapter -> the workers whose heartbeat says a slot holds it."""
        held: dict[str, set[str]] = {}
        for m, w in re.findall(r'^llmq:lora_resident\{model="([^"]+)",parent="[^"]+",worker="([^"]+)"\} 1\.0$',
                               self.metrics(), re.MULTILINE):
            held.setdefault(m, set()).add(w)
        return held

    def live_workers(self) -> int:
        return len(re.findall(r"^llmq:worker_info\{", self.metrics(), re.MULTILINE))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    adapters = build()
    redis, port = start_redis(tmp_path_factory.mktemp("redis-lora-affinity"))
    env = quick_env(port)
    api, base = start_api(env, name="api-lora-affinity")
    loras = [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
    workers = [start_worker(env, f"worker-affinity-{i}", concurrency=4, extra=[*loras, "--max-loras", "4"])
               for i in (1, 2)]
    try:
        fleet = Fleet(base=base, workers=workers)
        for w in workers:
            wait_model(base, DEMO_MODEL, w, timeout_s=180)
        wait_for(lambda: fleet.live_workers() == 2, 180, "two workers announced", workers[1])
        yield fleet
    finally:
        for proc in (*workers, api, redis):
            proc.stop()


def test_each_adapter_is_loaded_once_on_one_worker_whatever_the_order(fleet: Fleet) -> None:
    # Each adapter's first job goes to the base's queue (no worker holds it):
    # whichever worker takes it loads it and announces it at its next beat.
    for name in PHRASES:
        assert fleet.answer(name) == PHRASES[name]
        time.sleep(SETTLE_S)
    held = fleet.holders()
    assert set(held) == set(PHRASES) and all(len(w) == 1 for w in held.values()), held
    first = fleet.loads()
    assert sum(first.values()) == len(PHRASES), first
    # Then in other orders, one at a time and two at once: each goes to its
    # holder, never to the other worker, which would load it a second time.
    for order in (["bravo", "alpha", "delta", "charlie"], ["delta", "charlie", "bravo", "alpha"]):
        for name in order:
            assert fleet.answer(name) == PHRASES[name]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(fleet.answer, [*PHRASES] * 2)) == [*PHRASES.values()] * 2
    assert fleet.loads() == first, (first, fleet.loads())
    assert fleet.holders() == held
