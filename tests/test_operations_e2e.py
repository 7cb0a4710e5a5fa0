"""Operating llmq: two workers sharing a model queue (and one leaving
mid-burst), Prometheus metrics, the per-request log line in JSON, Flower."""

from __future__ import annotations

import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack
from tests.procs import free_port, spawn, start_api, start_worker, wait_for

pytestmark = pytest.mark.e2e

JOB_LINE = re.compile(r"job ((?:chatcmpl|cmpl)-[0-9a-f]+): (stop|length)")


def ask_many(base_url: str, model: str, n: int, max_tokens: int = 16) -> list[openai.types.chat.ChatCompletion]:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)

    def one(i: int) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Write a sentence about the number {i}."}],
            max_tokens=max_tokens, temperature=0.7)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def jobs_in_log(text: str) -> set[str]:
    return {m.group(1) for m in JOB_LINE.finditer(text)}


def test_two_workers_share_a_queue_and_one_leaves_mid_burst(stack: Stack) -> None:
    second = start_worker(stack.env, "worker-second", concurrency=4)
    try:
        wait_for(lambda: httpx.get(f"{stack.v1}/models").json()["data"][0]["workers"] == 2, 120,
                 "second worker registered", second)
        before_main = jobs_in_log(stack.worker.log.read_text())
        answers = ask_many(stack.base_url, stack.model, 24, max_tokens=8)
        ids = {a.id for a in answers}
        ran_main = (jobs_in_log(stack.worker.log.read_text()) - before_main) & ids
        ran_second = jobs_in_log(second.log.read_text()) & ids
        print(f"burst of 24 (16 + 4 slots): main worker ran {len(ran_main)}, second worker ran {len(ran_second)}")
        assert ran_main and ran_second and ran_main | ran_second == ids and not ran_main & ran_second

        # Second burst; the second worker gets a warm shutdown (SIGTERM) while jobs run.
        with ThreadPoolExecutor(max_workers=1) as pool:
            burst = pool.submit(ask_many, stack.base_url, stack.model, 24, 16)
            wait_for(lambda: len(jobs_in_log(second.log.read_text()) - ran_second) >= 1, 120, "second worker busy")
            second.stop(timeout_s=180)  # warm shutdown: it finishes the jobs it runs, takes no more
            answers = burst.result(timeout=300)
        assert len(answers) == 24 and all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        print("second burst: all 24 answered after the second worker stopped; exit code", second.popen.returncode)
        assert second.popen.returncode == 0
    finally:
        second.stop()


def metric_samples(base_url: str) -> dict[str, list]:  # type: ignore[type-arg]
    text = httpx.get(f"{base_url}/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_prometheus_metrics(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0)
    for stream in (False, True):
        r = client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, stream=stream)
        if stream:
            list(r)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    m = metric_samples(stack.base_url)
    model = {"model": stack.model}
    for hist in ("llmq:time_to_first_token_seconds", "llmq:inter_token_latency_seconds",
                 "llmq:e2e_request_latency_seconds", "llmq:request_queue_time_seconds"):
        assert value(m[hist], hist + "_count", **model) >= 2, hist
    assert value(m["llmq:prompt_tokens"], "llmq:prompt_tokens_total", **model) > 0
    assert value(m["llmq:generation_tokens"], "llmq:generation_tokens_total", **model) >= 16
    assert value(m["llmq:request_success"], "llmq:request_success_total", model=stack.model,
                 finished_reason="length") >= 2
    assert value(m["llmq:request_errors"], "llmq:request_errors_total", status="404", code="model_not_found") >= 1
    assert [s.labels for s in m["llmq:num_requests_waiting"]] == [model]
    assert [s.labels for s in m["llmq:num_workers"]] == [model]
    workers = {s.labels["worker"] for s in m["llmq:worker_generation_tokens_per_second"]}
    assert any(w.startswith("worker-main@") for w in workers), workers
    assert all(s.value > 0 for s in m["llmq:worker_engine_step_seconds"] if s.labels["worker"] in workers)
    print({k: len(v) for k, v in m.items()})


def test_one_json_log_line_per_request(stack: Stack) -> None:
    api, base = start_api({**stack.env, "LLMQ_LOG_FORMAT": "json"}, name="api-json-logs", log_level="info")
    try:
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": stack.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
        job_id = r.headers["x-request-id"]
        assert r.json()["id"] == job_id

        def logged() -> list[dict]:  # type: ignore[type-arg]
            lines = [json.loads(ln) for ln in api.log.read_text().splitlines() if ln.startswith("{")]
            return [ln for ln in lines if ln.get("job_id") == job_id]

        wait_for(lambda: bool(logged()), 10, "request log line")
        (line,) = logged()
        print(line)
        assert line["model"] == stack.model and line["worker"].startswith("worker-main@")
        assert line["status"] == "length" and line["completion_tokens"] == 5 and line["prompt_tokens"] > 0
        assert line["total_s"] > 0 and line["ttft_s"] > 0 and "queue_s" in line
    finally:
        api.stop()


def test_flower_sees_workers_queues_and_tasks_without_prompts(stack: Stack) -> None:
    port = free_port()
    flower = spawn("flower", [sys.executable, "-m", "celery", "--broker", stack.redis_url, "flower",
                              f"--port={port}", "--address=127.0.0.1", "--basic-auth=admin:s3cret"], stack.env)
    auth = ("admin", "s3cret")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{base}/api/workers", auth=auth, timeout=2).status_code == 200, 30, "flower", flower)
        assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401  # no credentials, no dashboard
        secret = "My secret code is 4417; say hello."
        with ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(lambda: openai.OpenAI(base_url=stack.v1, api_key="x", max_retries=0).chat.completions
                              .create(model=stack.model, messages=[{"role": "user", "content": secret}], max_tokens=48))
            queues: dict = {}
            names: list[str] = []
            deadline = time.monotonic() + 30
            # Flower learns a worker's queues by inspecting it, which may take
            # longer than the job itself: poll until it shows, not until the job ends.
            while f"llmq.{stack.model}" not in names and time.monotonic() < deadline:
                queues = httpx.get(f"{base}/api/queues/length", auth=auth, timeout=5).json()
                names = [q["name"] for q in queues.get("active_queues", [])]
                time.sleep(0.2)
            job_id = fut.result().id
        assert f"llmq.{stack.model}" in names, queues

        def task() -> dict:  # type: ignore[type-arg]
            return httpx.get(f"{base}/api/task/info/{job_id}", auth=auth, timeout=5).json()

        wait_for(lambda: task().get("state") == "SUCCESS", 30, "flower task record")
        info = task()
        print({k: info.get(k) for k in ("name", "state", "runtime", "worker", "kwargs")})
        assert info["name"] == "llmq.generate" and info["worker"].startswith("worker-main@")
        assert info["runtime"] > 0
        assert stack.model in info["kwargs"] and "4417" not in json.dumps(info)
        workers = httpx.get(f"{base}/api/workers?refresh=1", auth=auth, timeout=30).json()
        assert any(w.startswith("worker-main@") for w in workers)
    finally:
        flower.stop()
