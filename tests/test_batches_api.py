"""The API half of the Batch API, with no worker: real ``redis-server``, the
real API process, the real ``openai`` SDK. Lines a worker would run are
read back from the Celery queue in Redis (kombu keeps a queue as a Redis
list, one per priority step) and answered with ``broker.batches.record``,
the function a worker stores a line's result with: that is the contract.

Checked: structural problems fail the batch and name their lines; a refused
line lands in the error file with the answer the same request sent alone
gets, while the others are queued at the batch priority; stored results
become OpenAI's output file; a cancelled batch keeps what ran and lists the
rest as batch_cancelled; a batch outlives the API process that accepted it;
listing pages newest first."""

from __future__ import annotations

import base64
import io
import json
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from broker.batches import record
from broker.keys import Keys, batch_queue_name, queue_name
from broker.registry import announce
from broker.schemas import (
    Delta,
    Done,
    Embeddings,
    Heartbeat,
    Job,
    LineResult,
    ModelInfo,
    Started,
    Timings,
    TokenLogprob,
    Usage,
)
from tests.procs import Proc, start_api, start_redis, wait_for

pytestmark = pytest.mark.e2e

CHAT_MODEL, EMBED_MODEL = "batch-chat", "batch-embed"
KEYS = Keys()
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's default; step 0's list has no suffix
TICK_S = "0.2"
LEASE_S = "2"


@dataclass
class Api:
    base: str
    redis: redis.Redis
    client: openai.OpenAI


def api_env(redis_port: int) -> dict[str, str]:
    return {"LLMQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LLMQ_BATCH_TICK_S": TICK_S,
            "LLMQ_BATCH_LEASE_S": LEASE_S, "LLMQ_BATCH_CANCEL_GRACE_S": "1", "LLMQ_BATCH_MAX_LINES": "20"}


def served_once(r: redis.Redis) -> None:
    """The registry as a worker leaves it: both models served once, no worker live now."""
    models = [ModelInfo(name=CHAT_MODEL, queue=queue_name(CHAT_MODEL), context_length=2048, kind="chat"),
              ModelInfo(name=EMBED_MODEL, queue=queue_name(EMBED_MODEL), context_length=256, kind="embedding")]
    beat = Heartbeat(worker_id="gone", models=models, device="cpu", capacity=1, running=0, tokens_per_s=0,
                     version="test", started_at=time.time(), beat_at=time.time())
    announce(r, KEYS, beat, ttl_ms=1)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    redis_proc, port = start_redis(Path(tmp_path_factory.mktemp("redis-batches")))
    proc, base = start_api(api_env(port), name="api-batches", log_level="info")
    r = redis.Redis(port=port)
    served_once(r)
    try:
        yield Api(base, r, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0))
    finally:
        proc.stop()
        redis_proc.stop()


# ---------------------------------------------------------------- helpers


def chat_line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": f"Say {custom_id}."}], **body}}


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id


def submit(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes, endpoint: str = "/v1/chat/completions") -> str:
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint=endpoint,  # type: ignore[arg-type]
                                  completion_window="24h", metadata={"suite": "api"})
    assert batch.status == "validating" and batch.metadata == {"suite": "api"} and batch.id.startswith("batch_")
    return batch.id


def wait_status(client: openai.OpenAI, batch_id: str, status: str, timeout_s: float = 15, **counts: int) -> Any:
    def there() -> bool:
        b = client.batches.retrieve(batch_id)
        got = b.request_counts.model_dump() if b.request_counts else {}
        return b.status == status and all(got.get(k) == v for k, v in counts.items())

    wait_for(there, timeout_s, f"batch {batch_id} {status} {counts}")
    return client.batches.retrieve(batch_id)


def queued(r: redis.Redis, queue: str) -> dict[int, list[Job]]:
    """The jobs waiting on a Celery queue, per kombu priority step, in the order a worker gets them."""
    out: dict[int, list[Job]] = {}
    for step in PRIORITY_STEPS:
        name = queue if step == 0 else f"{queue}\x06\x16{step}"
        for raw in reversed(r.lrange(name, 0, -1)):  # kombu pushes on the left, takes from the right
            message = json.loads(raw)
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            job = Job.model_validate(kwargs["job"])
            assert message["headers"]["id"] == job.job_id  # the Celery task id is the job id
            out.setdefault(step, []).append(job)
    return out


def batch_jobs(r: redis.Redis, model: str, batch_id: str) -> list[Job]:
    jobs = [j for step_jobs in queued(r, batch_queue_name(model)).values() for j in step_jobs]
    return [j for j in jobs if j.batch and j.batch.batch_id == batch_id]


def answer(r: redis.Redis, job: Job, texts: list[str], logprobs: bool = False) -> bool:
    """Store a chat line's result as a worker does: one Delta and one Done per choice."""
    assert job.batch is not None
    events: list[Any] = [Started(job_id=job.job_id, seq=0, worker="w", prompt_tokens=7, queue_s=0.1)]
    for i, text in enumerate(texts):
        lp = [TokenLogprob(token=text, logprob=-0.5, top=[(text, -0.5)])] if logprobs else None
        events += [Delta(job_id=job.job_id, seq=2 * i + 1, index=i, text=text, completion_tokens=1, logprobs=lp),
                   Done(job_id=job.job_id, seq=2 * i + 2, index=i, finish_reason="stop",
                        usage=Usage(prompt_tokens=7, completion_tokens=1),
                        timings=Timings(queue_s=0.1, first_token_s=0.2, total_s=0.3))]
    result = LineResult(index=job.batch.index, custom_id=job.batch.custom_id, job_id=job.job_id, events=events,
                        finished_at=time.time())
    return record(r, KEYS, job.batch.batch_id, result)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).read().decode().splitlines()]


def route_error(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """What the route answers the same body sent alone."""
    got = httpx.post(f"{base}{path}", json=body, timeout=10)
    return got.status_code, got.json()["error"]


# ------------------------------------------------------------------ tests


def test_structural_problems_fail_the_whole_batch_and_name_their_lines(api: Api) -> None:
    c = api.client
    good = chat_line("a")
    rows = [json.dumps(good), "not json", json.dumps({**chat_line("b"), "custom_id": None}),
            json.dumps(chat_line("a")), json.dumps({**chat_line("c"), "url": "/v1/completions"}),
            json.dumps({**chat_line("d"), "method": "GET"}), "", json.dumps({**chat_line("e"), "body": "hi"}),
            json.dumps({**chat_line("f"), "extra": 1})]
    batch = wait_status(c, submit(c, ("\n".join(rows) + "\n").encode()), "failed")
    assert batch.errors is not None and batch.errors.object == "list"
    got = [(e.line, e.code, e.param) for e in batch.errors.data or []]
    assert got == [(2, "invalid_json_line", None), (3, "missing_required_parameter", "custom_id"),
                   (4, "duplicate_custom_id", "custom_id"), (5, "invalid_url", "url"), (6, "invalid_method", "method"),
                   (8, "invalid_request", "body"), (9, "invalid_request", "extra")], got
    assert "line 1" in (batch.errors.data or [])[2].message  # the duplicate names the first use
    assert batch.failed_at and batch.failed_at >= batch.created_at and batch.in_progress_at is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts and batch.request_counts.total == 0

    empty = wait_status(c, submit(c, b"\n\n"), "failed")
    assert [e.code for e in empty.errors.data] == ["empty_file"]
    too_many = wait_status(c, submit(c, [chat_line(f"x{i}") for i in range(21)]), "failed")  # LLMQ_BATCH_MAX_LINES=20
    assert [(e.code, e.line) for e in too_many.errors.data] == [("too_many_tasks", 21)]
    assert not api.redis.smembers(KEYS.batches_open())  # final batches leave the open set


def test_create_and_lookup_refusals(api: Api) -> None:
    c = api.client
    with pytest.raises(openai.NotFoundError) as missing:
        c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert missing.value.code == "file_not_found" and missing.value.param == "input_file_id"
    file_id = upload(c, [chat_line("a")])
    for field, value in (("completion_window", "1h"), ("endpoint", "/v1/responses")):
        with pytest.raises(openai.BadRequestError) as bad:
            c.batches.create(**{"input_file_id": file_id, "endpoint": "/v1/chat/completions",  # type: ignore[arg-type]
                                "completion_window": "24h", field: value})
        assert bad.value.param == field, bad.value
    for metadata in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(openai.BadRequestError) as bad:
            c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata=metadata)
        assert bad.value.param == "metadata", bad.value
    for call in (lambda: c.batches.retrieve("batch_nope"), lambda: c.batches.cancel("batch_nope")):
        with pytest.raises(openai.NotFoundError) as gone:
            call()
        assert gone.value.code == "batch_not_found" and gone.value.param == "batch_id"


def test_refused_lines_go_to_the_error_file_and_the_rest_are_queued_then_finalized(api: Api) -> None:
    c, r = api.client, api.redis
    lines = [
        chat_line("ok-0", service_tier="flex"),  # the tier is ignored: every line waits at the batch priority
        chat_line("hot", temperature=5),
        chat_line("streamed", stream=True),
        chat_line("unknown-model", model="never-served"),
        chat_line("embedder", model=EMBED_MODEL),
        chat_line("ok-5", n=2, logprobs=True, top_logprobs=1),
        chat_line("typo", temprature=1),
    ]
    batch_id = submit(c, lines)
    running = wait_status(c, batch_id, "in_progress", total=7, failed=5)
    assert running.in_progress_at and running.in_progress_at >= running.created_at

    # The refusals are stored before the chunk's lines are sent: wait for the sends.
    wait_for(lambda: sum(map(len, queued(r, batch_queue_name(CHAT_MODEL)).values())) >= 2, 30, "lines queued")
    steps = queued(r, batch_queue_name(CHAT_MODEL))
    assert list(steps) == [9], steps  # kombu's lowest step only
    jobs = steps[9]
    assert [(j.batch.index, j.batch.custom_id) for j in jobs] == [(0, "ok-0"), (5, "ok-5")]  # type: ignore[union-attr]
    assert all(j.priority == 9 and j.reply_channel == "" and j.batch.expires_at == running.expires_at  # type: ignore[union-attr]
               for j in jobs)
    assert jobs[1].n == 2 and jobs[1].sampling.logprobs == 1
    assert not r.exists(queue_name(CHAT_MODEL))  # nothing on the interactive queue

    # The keeper sets the gauges on its next tick.
    wanted = ['llmq:batches{status="in_progress"} 1.0', 'llmq:batches{status="validating"} 0.0',
              'llmq:batch_lines{state="queued"} 2.0', 'llmq:batch_lines{state="failed"} 5.0']
    wait_for(lambda: all(w in httpx.get(f"{api.base}/metrics", timeout=5).text for w in wanted), 5, "batch gauges")
    assert batch_id not in httpx.get(f"{api.base}/metrics", timeout=5).text  # never labelled by batch

    assert answer(r, jobs[0], ["zero"]) and answer(r, jobs[1], ["five", "FIVE"], logprobs=True)
    assert not answer(r, jobs[0], ["again"])  # a second copy of a line stores nothing
    done = wait_status(c, batch_id, "completed")
    assert done.finalizing_at and done.completed_at and done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.request_counts and done.request_counts.model_dump() == {"total": 7, "completed": 2, "failed": 5}
    assert not r.sismember(KEYS.batches_open(), batch_id)

    out = jsonl(c, done.output_file_id)
    assert [o["custom_id"] for o in out] == ["ok-0", "ok-5"]
    assert all(o["id"].startswith("batch_req_") and o["error"] is None for o in out)
    first, fifth = (o["response"] for o in out)
    assert first["status_code"] == 200 and first["request_id"] == jobs[0].job_id == first["body"]["id"]
    assert first["body"]["object"] == "chat.completion" and first["body"]["model"] == CHAT_MODEL
    assert first["body"]["choices"][0]["message"]["content"] == "zero"
    assert first["body"]["usage"] == {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    assert first["body"]["service_tier"] == "default"
    assert [ch["message"]["content"] for ch in fifth["body"]["choices"]] == ["five", "FIVE"]
    assert fifth["body"]["choices"][1]["logprobs"]["content"][0]["token"] == "FIVE"

    errors = jsonl(c, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["hot", "streamed", "unknown-model", "embedder", "typo"]
    by_id = {e["custom_id"]: e["response"] for e in errors}
    # Refused as the same request sent alone is refused (the route answers these before any worker is asked).
    for custom_id in ("hot", "unknown-model", "typo"):
        body = next(line["body"] for line in lines if line["custom_id"] == custom_id)
        status, error = route_error(api.base, "/v1/chat/completions", body)
        assert (by_id[custom_id]["status_code"], by_id[custom_id]["body"]["error"]) == (status, error), custom_id
    assert by_id["hot"]["body"]["error"]["param"] == "temperature"
    assert by_id["unknown-model"]["body"]["error"]["code"] == "model_not_found"
    assert by_id["streamed"]["status_code"] == 400 and by_id["streamed"]["body"]["error"]["param"] == "stream"
    assert by_id["embedder"]["body"]["error"]["code"] == "wrong_model_kind"
    assert all(e["error"] is None and e["response"]["request_id"].startswith("chatcmpl-") for e in errors)

    output = c.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch_id}_output.jsonl"
    with pytest.raises(openai.BadRequestError) as bad:  # a result file is no batch input
        c.batches.create(input_file_id=output.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert bad.value.param == "input_file_id"


def test_embeddings_lines_render_as_the_embeddings_route_answers(api: Api) -> None:
    c, r = api.client, api.redis
    lines = [{"custom_id": f"e-{fmt}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": EMBED_MODEL, "input": ["a", "b"], "encoding_format": fmt}} for fmt in ("float", "base64")]
    lines.append({"custom_id": "chat-model", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": CHAT_MODEL, "input": "a"}})
    batch_id = submit(c, lines, "/v1/embeddings")
    wait_status(c, batch_id, "in_progress", failed=1)
    jobs = batch_jobs(r, EMBED_MODEL, batch_id)
    assert [(j.kind, j.inputs) for j in jobs] == [("embedding", ["a", "b"])] * 2
    vectors = [base64.b64encode(array("f", [0.5, -1.0, 2.0]).tobytes()).decode(), base64.b64encode(
        array("f", [1.0, 0.0, 0.25]).tobytes()).decode()]
    for job in jobs:
        assert job.batch is not None
        ev = Embeddings(job_id=job.job_id, seq=0, vectors=vectors, prompt_tokens=4)
        assert record(r, KEYS, batch_id, LineResult(index=job.batch.index, custom_id=job.batch.custom_id,
                                                   job_id=job.job_id, events=[ev], finished_at=time.time()))
    done = wait_status(c, batch_id, "completed")
    floats, b64 = (o["response"]["body"] for o in jsonl(c, done.output_file_id))
    assert floats["object"] == "list" and floats["model"] == EMBED_MODEL
    assert [d["embedding"] for d in floats["data"]] == [[0.5, -1.0, 2.0], [1.0, 0.0, 0.25]]
    assert [d["embedding"] for d in b64["data"]] == vectors and b64["usage"]["prompt_tokens"] == 4
    [refused] = jsonl(c, done.error_file_id)
    assert refused["custom_id"] == "chat-model" and refused["response"]["body"]["error"]["code"] == "wrong_model_kind"


def test_cancel_keeps_what_ran_and_lists_the_rest_as_cancelled(api: Api) -> None:
    c, r = api.client, api.redis
    batch_id = submit(c, [chat_line(f"c{i}") for i in range(3)])
    wait_status(c, batch_id, "in_progress", total=3)
    wait_for(lambda: len(batch_jobs(r, CHAT_MODEL, batch_id)) == 3, 10, "three lines queued")
    jobs = batch_jobs(r, CHAT_MODEL, batch_id)
    assert answer(r, jobs[0], ["ran"])
    cancelling = c.batches.cancel(batch_id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    assert r.hget(KEYS.batch(batch_id), "status") == b"cancelling"  # what a worker reads before it runs a line
    assert c.batches.cancel(batch_id).status == "cancelling"  # again: no change
    batch = wait_status(c, batch_id, "cancelled", timeout_s=15)  # LLMQ_BATCH_CANCEL_GRACE_S=1
    assert batch.cancelled_at and batch.cancelled_at >= batch.cancelling_at + 1
    assert batch.request_counts and batch.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    assert [o["custom_id"] for o in jsonl(c, batch.output_file_id)] == ["c0"]
    unrun = jsonl(c, batch.error_file_id)
    assert [(e["custom_id"], e["response"], e["error"]["code"]) for e in unrun] == [
        ("c1", None, "batch_cancelled"), ("c2", None, "batch_cancelled")]
    # A line that ends after the batch was finalized is stored and counted nowhere.
    assert not answer(r, jobs[2], ["late"])
    assert c.batches.retrieve(batch_id).request_counts.model_dump() == {  # type: ignore[union-attr]
        "total": 3, "completed": 1, "failed": 2}
    with pytest.raises(openai.ConflictError) as final:
        c.batches.cancel(batch_id)
    assert "cancelled" in final.value.message


def test_a_batch_outlives_the_api_process_that_accepted_it(tmp_path: Path) -> None:
    """The accepting API is SIGKILLed as soon as its keeper has validated the
    batch (mostly while it sends the lines, holding the lease); with no API
    left the batch waits in Redis; a new API process takes it over once the
    lease expires, queues every line and finalizes it."""
    redis_proc, port = start_redis(tmp_path)
    env = {**api_env(port), "LLMQ_BATCH_MAX_LINES": "50000"}
    procs: list[Proc] = [redis_proc]
    try:
        r = redis.Redis(port=port)
        served_once(r)
        first, base = start_api(env, name="api-batch-doomed", log_level="info")
        procs.append(first)
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        count = 1200  # a few enqueue chunks
        batch_id = submit(c, [chat_line(f"k{i}", max_tokens=1) for i in range(count)])
        deadline = time.monotonic() + 30
        while r.hget(KEYS.batch(batch_id), "status") != b"in_progress" and time.monotonic() < deadline:
            time.sleep(0.002)
        first.kill()
        sent = int(r.hget(KEYS.batch(batch_id), "enqueued") or 0)
        print(f"killed the accepting API with {sent} of {count} lines sent")
        time.sleep(0.5)
        assert r.hget(KEYS.batch(batch_id), "status") == b"in_progress" and r.sismember(KEYS.batches_open(), batch_id)

        second, base2 = start_api(env, name="api-batch-heir", log_level="info")
        procs.append(second)
        c2 = openai.OpenAI(base_url=f"{base2}/v1", api_key="unused", max_retries=0)
        wait_for(lambda: {j.batch.index for j in batch_jobs(r, CHAT_MODEL, batch_id)} == set(range(count)),  # type: ignore[union-attr]
                 30, "every line queued")
        jobs = {j.batch.index: j for j in batch_jobs(r, CHAT_MODEL, batch_id)}  # type: ignore[union-attr]
        for index, job in sorted(jobs.items()):
            answer(r, job, [f"answer {index}"])
        done = wait_status(c2, batch_id, "completed", timeout_s=30)
        assert done.request_counts and done.request_counts.model_dump() == {
            "total": count, "completed": count, "failed": 0}
        out = jsonl(c2, done.output_file_id)
        assert [o["custom_id"] for o in out] == [f"k{i}" for i in range(count)]
        assert [o["response"]["body"]["choices"][0]["message"]["content"] for o in out[:2]] == ["answer 0", "answer 1"]
        assert done.error_file_id is None
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_listing_is_newest_first_and_pages(api: Api) -> None:
    c = api.client
    ids = [submit(c, [chat_line("l")]) for _ in range(3)]
    page = httpx.get(f"{api.base}/v1/batches", params={"limit": 2}, timeout=5).json()
    assert [b["id"] for b in page["data"]] == ids[:0:-1] and page["has_more"]
    assert (page["first_id"], page["last_id"]) == (ids[2], ids[1]) and page["object"] == "list"
    after = c.batches.list(limit=2, after=ids[1])
    assert after.data[0].id == ids[0]
    everything = [b.id for b in c.batches.list(limit=2)]  # the SDK follows has_more and last_id
    assert everything[:3] == ids[::-1] and len(everything) == len(set(everything))
    created = [c.batches.retrieve(i).created_at for i in everything]
    assert created == sorted(created, reverse=True)
    assert len(everything) == api.redis.zcard(KEYS.batches())
    for bad in ({"limit": 0}, {"limit": 101}, {"after": "batch_nope"}):
        got = httpx.get(f"{api.base}/v1/batches", params=bad, timeout=5)
        assert got.status_code == 400 and got.json()["error"]["param"] in ("limit", "after"), got.text
    for batch_id in ids:
        c.batches.cancel(batch_id)
