"""The Batch API and priorities end to end: real Redis, API and Celery
workers, the real ``openai`` SDK. A batch is uploaded, run and downloaded
with every line answered once; a running batch is cancelled; a worker is
SIGKILLed mid-batch and every line is still answered exactly once; a job's
``service_tier`` decides which waiting job a busy worker takes next."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import redis

from cli.demo_model import embedding_model_dir
from tests.conftest import Stack
from tests.procs import NO_END_BIAS, free_port, spawn, start_worker, wait_for, wait_model

pytestmark = pytest.mark.e2e

FINAL = {"completed", "failed", "expired", "cancelled"}


def client_of(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=60)


def chat_lines(model: str, count: int, max_tokens: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Count to {i}."}], **extra}}
            for i in range(count)]


def submit(client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str = "/v1/chat/completions") -> str:
    data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    upload = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h", metadata={"test": "yes"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"test": "yes"}
    return batch.id


def wait_final(client: openai.OpenAI, batch_id: str, timeout_s: float) -> Any:
    seen: list[tuple[str, int]] = []

    def final() -> bool:
        b = client.batches.retrieve(batch_id)
        counts = b.request_counts
        seen.append((b.status, counts.completed + counts.failed if counts else 0))
        return b.status in FINAL

    wait_for(final, timeout_s, f"batch {batch_id} final")
    return client.batches.retrieve(batch_id), seen


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).read().decode().splitlines() if line]


def test_a_batch_runs_to_completed_and_every_line_is_answered_once(stack: Stack) -> None:
    client = client_of(stack)
    lines = chat_lines(stack.model, 12, 8)
    lines[3]["body"]["n"] = 2
    lines[5]["body"]["temperature"] = 5  # refused as the same request would be: in the error file
    batch_id = submit(client, lines)
    batch, seen = wait_final(client, batch_id, 240)
    print("statuses seen:", seen[:3], "...", seen[-2:])
    assert batch.status == "completed", batch
    assert batch.request_counts and batch.request_counts.total == 12
    assert (batch.request_counts.completed, batch.request_counts.failed) == (11, 1)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    out, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(12) if i != 5)
    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None and o["id"].startswith("batch_req_")
        assert body["object"] == "chat.completion" and body["model"] == stack.model
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
        assert len(body["choices"]) == (2 if o["custom_id"] == "line-3" else 1)
    [bad] = errors
    assert bad["custom_id"] == "line-5" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "temperature"
    # Progress moved while it ran: the counts were read between 0 and 12.
    assert any(0 < done < 12 for _, done in seen) or len(seen) < 3


def test_completions_and_embeddings_batches(stack: Stack, embedding_worker: str) -> None:
    client = client_of(stack)
    text = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": stack.model, "prompt": f"Once upon a time {i}", "max_tokens": 5}} for i in range(3)]
    embed = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": embedding_worker, "input": [f"sentence {i}", "another"]}} for i in range(3)]
    ids = [submit(client, text, "/v1/completions"), submit(client, embed, "/v1/embeddings")]
    done = [wait_final(client, i, 180)[0] for i in ids]
    assert [b.status for b in done] == ["completed", "completed"]
    completions, embeddings = (jsonl(client, b.output_file_id) for b in done)
    assert {o["response"]["body"]["object"] for o in completions} == {"text_completion"}
    assert all(o["response"]["body"]["choices"][0]["text"] for o in completions)
    vectors = [d["embedding"] for o in embeddings for d in o["response"]["body"]["data"]]
    assert len(vectors) == 6 and all(len(v) == 384 for v in vectors)


@pytest.fixture(scope="module")
def embedding_worker(stack: Stack) -> Iterator[str]:
    name = "batch-minilm"
    proc = spawn("worker-batch-minilm", [sys.executable, "-m", "cli.main", "worker", "--model-path",
                                         str(embedding_model_dir()), "--model-name", name, "--concurrency", "2"],
                 stack.env)
    try:
        wait_model(stack.base_url, name, proc)
        yield name
    finally:
        proc.stop()


def test_cancel_a_running_batch_keeps_what_ran_and_runs_nothing_more(stack: Stack) -> None:
    model = "batch-cancel"
    worker = start_worker(stack.env, "batch-cancel", model_names=model, concurrency=2,
                          extra=["--batch-reserve", "0"])
    client = client_of(stack)
    try:
        wait_model(stack.base_url, model, worker)
        batch_id = submit(client, chat_lines(model, 40, 24, logit_bias=NO_END_BIAS))
        wait_for(lambda: (client.batches.retrieve(batch_id).request_counts or object()).completed >= 2, 120,
                 "two lines done", worker)
        cancelling = client.batches.cancel(batch_id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at
        batch, _ = wait_final(client, batch_id, 120)
        assert batch.status == "cancelled" and batch.cancelled_at
        out, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
        ran = {o["custom_id"] for o in out}
        unrun = {e["custom_id"] for e in errors if (e["error"] or {}).get("code") == "batch_cancelled"}
        print(f"cancelled: {len(ran)} lines ran, {len(unrun)} not run")
        # Only the lines done or running when it was cancelled ran (2 threads).
        assert 2 <= len(ran) <= cancelling.request_counts.completed + 2  # type: ignore[union-attr]
        assert ran | unrun == {f"line-{i}" for i in range(40)} and not ran & unrun
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch_id)
    finally:
        worker.stop()


def test_a_worker_killed_mid_batch_costs_no_line_and_runs_none_twice(stack: Stack) -> None:
    model = "batch-kill"
    doomed = start_worker(stack.env, "batch-doomed", model_names=model, concurrency=4, extra=["--batch-reserve", "0"])
    client = client_of(stack)
    spare = None
    r = redis.Redis.from_url(stack.redis_url)
    try:
        wait_model(stack.base_url, model, doomed)
        batch_id = submit(client, chat_lines(model, 16, 16, logit_bias=NO_END_BIAS))
        wait_for(lambda: (client.batches.retrieve(batch_id).request_counts or object()).completed >= 1, 120,
                 "a line done", doomed)
        claimed = {k.decode().split(":")[2] for k in r.scan_iter("llmq:job:*:claim")
                   if (r.get(k) or b"").startswith(b"batch-doomed@")}
        stored = {json.loads(v)["job_id"] for v in r.hvals(f"llmq:batch:{batch_id}:results")}
        doomed.kill()
        running = claimed - stored
        print(f"killed while running {len(running)} lines; {len(stored)} stored")
        assert running, "the worker was killed with no line under way"
        spare = start_worker(stack.env, "batch-spare", model_names=model, concurrency=4)
        batch, _ = wait_final(client, batch_id, 240)
        assert batch.status == "completed", batch
        out = jsonl(client, batch.output_file_id)
        ids = [o["custom_id"] for o in out]
        assert sorted(ids) == sorted(f"line-{i}" for i in range(16)) and len(set(ids)) == 16
        assert batch.request_counts and (batch.request_counts.completed, batch.request_counts.failed) == (16, 0)
    finally:
        doomed.kill()
        if spare is not None:
            spare.stop()


def test_service_tier_orders_waiting_jobs_and_is_echoed(stack: Stack) -> None:
    """One thread, busy: jobs sent flex, default, priority start in the
    reverse order (kombu's priority steps), and each answer names its tier."""
    model = "tier-model"
    worker = start_worker(stack.env, "tier-worker", model_names=model, concurrency=1)
    client = client_of(stack)
    try:
        wait_model(stack.base_url, model, worker)
        answers: dict[str, Any] = {}
        with ThreadPoolExecutor(max_workers=4) as pool:
            def ask(tier: str | None, tokens: int) -> None:
                kwargs = {"service_tier": tier} if tier else {}
                answers[tier or "busy"] = client.chat.completions.create(
                    model=model, max_tokens=tokens, messages=[{"role": "user", "content": "Tell a story."}],
                    logit_bias=NO_END_BIAS, **kwargs)
                answers[f"{tier or 'busy'}-at"] = time.monotonic()

            busy = pool.submit(ask, None, 48)
            time.sleep(1.5)  # the one thread runs the busy job; the rest wait in the queue
            waiting = [pool.submit(ask, tier, 4) for tier in ("flex", "default", "priority")]
            for f in [busy, *waiting]:
                f.result(timeout=120)
        order = sorted(("flex", "default", "priority"), key=lambda t: answers[f"{t}-at"])
        assert order == ["priority", "default", "flex"], order
        assert [answers[t].service_tier for t in ("flex", "default", "priority")] == ["flex", "default", "priority"]
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           service_tier="scale")  # type: ignore[arg-type]
        assert bad.value.body["param"] == "service_tier"  # type: ignore[index]
    finally:
        worker.stop()


def test_flower_shows_batch_lines_as_tasks_without_prompts(stack: Stack) -> None:
    port = free_port()
    flower = spawn("flower-batch", [sys.executable, "-m", "celery", "--broker", stack.redis_url, "flower",
                                    f"--port={port}", "--address=127.0.0.1", "--basic-auth=admin:s3cret"],
                   stack.env)
    auth = ("admin", "s3cret")
    base = f"http://127.0.0.1:{port}"
    client = client_of(stack)
    try:
        wait_for(lambda: httpx.get(f"{base}/api/workers", auth=auth, timeout=2).status_code == 200, 30, "flower",
                 flower)
        # Flower records only the task events sent after it asked the workers
        # for them: first see an interactive job recorded with its name (a new
        # one each try, as one sent too early is never named).
        def recording() -> bool:
            probe = client.chat.completions.create(model=stack.model, max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}])
            for _ in range(20):
                info = httpx.get(f"{base}/api/task/info/{probe.id}", auth=auth, timeout=5)
                if info.status_code == 200 and info.json().get("name"):
                    return True
                time.sleep(0.1)
            return False

        wait_for(recording, 60, "flower recording task events", flower)
        secret = "My secret code is 5521; say hello."
        lines = [{"custom_id": "secret-line", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": stack.model, "max_tokens": 4, "messages": [{"role": "user", "content": secret}]}}]
        batch, _ = wait_final(client, submit(client, lines), 120)
        [line] = jsonl(client, batch.output_file_id)
        job_id = line["response"]["request_id"]

        def task() -> dict[str, Any]:
            return httpx.get(f"{base}/api/task/info/{job_id}", auth=auth, timeout=5).json()  # type: ignore[no-any-return]

        wait_for(lambda: task().get("state") == "SUCCESS", 30, "flower task record")
        info = task()
        print({k: info.get(k) for k in ("name", "state", "worker", "kwargs")})
        assert info["name"] == "llmq.generate" and batch.id in info["kwargs"] and "secret-line" in info["kwargs"]
        assert json.loads(info["kwargs"])["priority"] == 9 and "5521" not in json.dumps(info)
    finally:
        flower.stop()
