"""Queue deadlines and scale from zero, with real Redis, API and synthetic
workers: a job still queued past its max queue time is dropped unrun (a 429
before any chunk, revoked in Celery's events as Flower shows them, counted
in /metrics), and a declared model with no worker holds its requests until
one starts."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from broker.celery_app import make_celery
from broker.settings import Settings
from tests.procs import Proc, spawn, start_api, start_redis, wait_for, wait_model

pytestmark = pytest.mark.e2e

BUSY = "synth-busy"  # one thread: a long answer holds it, the next job queues
LATE = "synth-late"  # declared, no worker until a test starts one
STEP_MS = 10
LONG_TOKENS = 400  # 4 s an answer at 10 ms a step
WAIT_FOR_WORKER_S = 60


@dataclass
class Policy:
    base: str
    env: dict[str, str]
    busy: Proc

    def client(self, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120,
                             default_headers=headers or None)


def synthetic_worker(name: str, env: dict[str, str], model: str, concurrency: int) -> Proc:
    return spawn(name, [sys.executable, "-m", "cli.main", "worker", "--engine", "synthetic", "--model-name", model,
                        "--concurrency", str(concurrency), "--hostname", f"{name}@%h", "--synthetic-step-ms",
                        str(STEP_MS), "--synthetic-output-tokens", str(LONG_TOKENS)], env)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Policy]:
    redis, port = start_redis(tmp_path_factory.mktemp("redis-policy"))
    env = {"LLMQ_REDIS_URL": f"redis://127.0.0.1:{port}/0", "LLMQ_HEARTBEAT_INTERVAL_S": "0.5",
           "LLMQ_HEARTBEAT_TTL_S": "2.0", "LLMQ_REGISTRY_CACHE_S": "0.2",
           "LLMQ_MODELS": json.dumps([{"name": LATE, "kind": "chat", "context_length": 4096}]),
           "LLMQ_WAIT_FOR_WORKER_S": str(WAIT_FOR_WORKER_S)}
    api, base = start_api(env, name="api-policy")
    busy = synthetic_worker("worker-busy", env, BUSY, concurrency=1)
    try:
        wait_model(base, BUSY, busy)
        yield Policy(base=base, env=env, busy=busy)
    finally:
        for proc in (busy, api, redis):
            proc.stop()


def ask() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Tell me a long story."}]


def metric(base: str, name: str, model: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    m = re.search(rf'^{re.escape(name)}{{model="{re.escape(model)}"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


class Revoked:
    """Celery's task-revoked events, read as Flower reads them."""

    def __init__(self, redis_url: str) -> None:
        self.ids: dict[str, dict[str, Any]] = {}
        self._app = make_celery(Settings(redis_url=redis_url))
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "no event receiver"

    def _run(self) -> None:
        with self._app.connection() as conn:
            recv = self._app.events.Receiver(conn, handlers={"task-revoked": self._on})
            self._ready.set()
            while not self._stop.is_set():
                try:
                    recv.capture(limit=None, timeout=0.5, wakeup=False)
                except TimeoutError:
                    continue

    def _on(self, event: dict[str, Any]) -> None:
        self.ids[event["uuid"]] = event

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def hold_the_worker(policy: Policy) -> tuple[ThreadPoolExecutor, Future[Any]]:
    """A long answer on the busy worker's one thread; returns once it streams."""
    started = threading.Event()

    def long_answer() -> int:
        chunks = 0
        stream = policy.client().chat.completions.create(model=BUSY, messages=ask(), stream=True, temperature=0,
                                                         max_tokens=LONG_TOKENS)
        for _ in stream:
            chunks += 1
            started.set()
        return chunks

    pool = ThreadPoolExecutor(4)
    fut = pool.submit(long_answer)
    assert started.wait(30), "the long answer never started"
    return pool, fut


def test_a_job_still_queued_past_its_max_queue_time_is_dropped_unrun(policy: Policy) -> None:
    revoked = Revoked(policy.env["LLMQ_REDIS_URL"])
    before = metric(policy.base, "llmq:queue_deadline_expired_total", BUSY)
    pool, holder = hold_the_worker(policy)
    try:
        client = policy.client(**{"x-llmq-max-queue-time": "1"})
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as plain:
            client.chat.completions.create(model=BUSY, messages=ask())
        waited = time.monotonic() - started
        # A streamed request gets the same error as its HTTP status, before any chunk.
        with pytest.raises(openai.RateLimitError) as streamed:
            client.chat.completions.create(model=BUSY, messages=ask(), stream=True)
        for exc in (plain.value, streamed.value):
            body = exc.response.json()["error"]
            assert body["code"] == "max_queue_time_exceeded" and body["type"] == "rate_limit_error", body
            assert "max queue time of 1 s" in body["message"], body["message"]
            assert int(exc.response.headers["retry-after"]) >= 1
        assert 1.0 <= waited < 3.0, waited  # dropped at its deadline, not when the worker came free
        assert not holder.done()  # the worker was busy all along: nothing ran them
        assert metric(policy.base, "llmq:queue_deadline_expired_total", BUSY) == before + 2
        # A response (given up by the responses keeper, not a waiting request) too.
        with pytest.raises(openai.RateLimitError) as response:
            client.responses.create(model=BUSY, input="Tell me a long story.")
        assert response.value.response.json()["error"]["code"] == "max_queue_time_exceeded"
        assert holder.result(timeout=60) > 0
        # Taken after the long answer, both messages are revoked as expired
        # (Flower shows them so), not run and not failed.
        wait_for(lambda: sum(1 for e in revoked.ids.values() if e.get("expired")) >= 3, 30,
                 "three task-revoked events (expired)")
    finally:
        pool.shutdown(wait=False)
        revoked.close()


def test_a_job_that_starts_in_time_runs_whatever_its_max_queue_time(policy: Policy) -> None:
    out = policy.client(**{"x-llmq-max-queue-time": "5"}).chat.completions.create(
        model=BUSY, messages=ask(), max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage is not None and out.usage.completion_tokens == 8


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_max_queue_time_is_a_400_naming_the_header(policy: Policy, value: str) -> None:
    r = httpx.post(f"{policy.base}/v1/chat/completions", headers={"x-llmq-max-queue-time": value},
                   json={"model": BUSY, "messages": ask()}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "x-llmq-max-queue-time" and err["code"] == "invalid_value", err


def test_a_declared_model_waits_for_its_first_worker(policy: Policy) -> None:
    models = {m["id"]: m for m in httpx.get(f"{policy.base}/v1/models", timeout=5).json()["data"]}
    assert models[LATE]["workers"] == 0 and models[LATE]["context_length"] == 4096
    pool = ThreadPoolExecutor(2)
    client = policy.client()

    def plain() -> str:
        out = client.chat.completions.create(model=LATE, messages=ask(), max_tokens=6, temperature=0)
        return out.choices[0].message.content or ""

    def streamed() -> str:
        stream = client.chat.completions.create(model=LATE, messages=ask(), max_tokens=6, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    answers = [pool.submit(plain), pool.submit(streamed)]
    worker: Proc | None = None
    try:
        time.sleep(15)
        assert not any(a.done() for a in answers), [a.exception() for a in answers if a.done()]
        # What an autoscaler reads to start the first worker.
        assert metric(policy.base, "llmq:num_jobs_outstanding", LATE) == 2
        worker = synthetic_worker("worker-late", policy.env, LATE, concurrency=4)
        texts = [a.result(timeout=90) for a in answers]
        assert all(texts) and texts[0] == texts[1], texts  # greedy: the same words either way
        assert {m["id"]: m for m in httpx.get(f"{policy.base}/v1/models", timeout=5).json()["data"]}[LATE][
            "workers"] == 1
    finally:
        pool.shutdown(wait=False)
        if worker is not None:
            worker.stop()


def test_past_the_wait_for_a_worker_the_answer_is_a_503_with_retry_after(policy: Policy) -> None:
    env = {**policy.env, "LLMQ_WAIT_FOR_WORKER_S": "2"}
    api, base = start_api(env, name="api-policy-short-wait")
    try:
        wait_for(lambda: LATE not in {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"]
                                      if m["workers"]}, 30, "the late worker gone")
        started = time.monotonic()
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": LATE, "messages": ask()}, timeout=30)
        assert 2.0 <= time.monotonic() - started < 10
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_live_worker" and int(r.headers["retry-after"]) >= 1
        r = httpx.post(f"{base}/v1/responses", json={"model": LATE, "input": "Hello?"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_live_worker", r.text
        # An undeclared model with no worker is refused at once, as always.
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": "never-declared", "messages": ask()},
                       timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        api.stop()
