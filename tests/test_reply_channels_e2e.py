"""Jobs travel as Celery tasks on the model's queue and tokens come back on
the reply channel of the API process that sent them: two API processes on
one Redis never see each other's tokens."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import defaultdict

import openai
import pytest
import redis

from broker.schemas import parse_message
from tests.conftest import Stack
from tests.procs import start_api

pytestmark = pytest.mark.e2e


def test_two_apis_share_redis_without_crosstalk(stack: Stack) -> None:
    api2, base2 = start_api(stack.env, name="api-2")
    r = redis.Redis.from_url(stack.redis_url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("llmq:reply:*")
    seen: dict[str, set[str]] = defaultdict(set)  # job id -> channels its events came on
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.2)
            if msg:
                for event in parse_message(msg["data"]):  # one event, or a step's events for one channel
                    seen[event.job_id].add(msg["channel"].decode())

    listener = threading.Thread(target=listen)
    listener.start()
    results: dict[str, tuple[str, str]] = {}

    def ask(base: str, key: str) -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=stack.model, messages=[{"role": "user", "content": "Name a color."}], max_tokens=12, stream=True,
            temperature=0,
        )
        chunks = list(stream)
        results[key] = (chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    try:
        threads = [threading.Thread(target=ask, args=(b, f"{n}-{i}"))
                   for i in range(3) for n, b in (("a", stack.base_url), ("b", base2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        listener.join()
        api2.stop()

    assert len(results) == 6
    texts = {text for _, text in results.values()}
    assert len(texts) == 1 and texts.pop(), results  # same greedy answer everywhere
    channel_of = {}
    for key, (job_id, _) in results.items():
        assert len(seen[job_id]) == 1, f"job {job_id} published on {seen[job_id]}"
        channel_of[key] = seen[job_id].pop()
    a_channels = {c for k, c in channel_of.items() if k.startswith("a")}
    b_channels = {c for k, c in channel_of.items() if k.startswith("b")}
    print("reply channels:", a_channels, b_channels)
    assert len(a_channels) == 1 and len(b_channels) == 1 and a_channels != b_channels


def test_jobs_are_celery_tasks_on_the_model_queue(stack: Stack) -> None:
    """Watch Celery's own task-sent events: the job is a task named
    llmq.generate routed to the model's queue, with a summary, not the
    prompt, as its arguments."""
    r = redis.Redis.from_url(stack.redis_url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    # Celery's redis transport publishes task events on this fanout channel.
    pubsub.psubscribe("/*.celeryev/*")
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0)
    secret = "The secret word is pineapple. Repeat it."
    job_id = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": secret}], max_tokens=2).id
    events = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg:
            decoded = json.loads(base64.b64decode(json.loads(msg["data"])["body"]))
            # Workers buffer task events and may send several as one list,
            # late: keep only this job's (the task id is the job id).
            batch = decoded if isinstance(decoded, list) else [decoded]
            events.extend(e for e in batch if e.get("uuid") == job_id)
        if any(e.get("type") == "task-succeeded" for e in events):
            break
    sent = [e for e in events if e.get("type") == "task-sent"]
    assert sent, [e.get("type") for e in events]
    assert sent[0]["name"] == "llmq.generate" and sent[0]["queue"] == f"llmq.{stack.model}"
    received = [e for e in events if e.get("type") == "task-received"]
    assert received and "pineapple" not in json.dumps(received) and "pineapple" not in json.dumps(sent)
    assert '"model": "smollm2-135m-instruct"' in received[0]["kwargs"]
