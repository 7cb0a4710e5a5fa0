"""The Responses API end to end: real Redis, API processes and Celery
workers, the real ``openai`` SDK. A streamed answer equals the stored one; a
stream cut after N events resumes on another API process with events N+1...
(no gap, no repeat); background responses are polled, cancelled, continued
with ``previous_response_id``; a worker SIGKILLed before its first token
costs nothing, after it the response fails clearly; an API process
SIGKILLed while a background response runs loses nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.conftest import HEARTBEAT_TTL_S, Stack
from tests.holds import hold_key, start_held_worker
from tests.procs import Proc, start_api, start_worker, wait_for

pytestmark = pytest.mark.e2e

STORY = "Tell me a long story about a lighthouse keeper and the sea, with many details."
LONG_PROMPT = "Summarise this text. " + "The lighthouse keeper climbed the stairs every night. " * 300
ENDED = {"completed", "failed", "cancelled", "incomplete"}


def client_of(base_v1: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_v1, api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def second_api(stack: Stack) -> Iterator[str]:
    """Another API process on the same Redis: a client may come back to either."""
    proc, base = start_api(stack.env, name="api-responses-2")
    try:
        yield f"{base}/v1"
    finally:
        proc.stop()


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def seqs(events: list[Any]) -> list[int]:
    return [e.sequence_number for e in events]


def wait_ended(client: openai.OpenAI, response_id: str, timeout_s: float = 180) -> Any:
    seen: list[str] = []

    def ended() -> bool:
        r = client.responses.retrieve(response_id)
        seen.append(r.status or "")
        return r.status in ENDED

    wait_for(ended, timeout_s, f"response {response_id} ended")
    return client.responses.retrieve(response_id), seen


def claimer(r: redis.Redis, job_id: str) -> str:
    raw: Any = r.get(f"llmq:job:{job_id}:claim")
    return raw.decode() if raw else ""


def cards(base_url: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"]}


def proc_of(workers: list[Proc], worker_id: str) -> Proc:
    return next(p for p in workers if worker_id.startswith(p.name + "@"))


def stored_job(r: redis.Redis, response_id: str) -> dict[str, Any]:
    raw: Any = r.hget(f"llmq:response:{response_id}", "record")
    assert raw is not None
    job: dict[str, Any] = json.loads(raw)["job"]
    return job


def test_streamed_text_equals_stored_text_and_a_cut_stream_resumes_on_another_api(stack: Stack,
                                                                                  second_api: str) -> None:
    client = client_of(stack.v1)
    # A whole stream: numbered from 0, no gap; its text is what GET returns.
    events = list(client.responses.create(model=stack.model, input="Name three colours.", temperature=0,
                                          max_output_tokens=40, stream=True))
    assert seqs(events) == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    stored = client.responses.retrieve(events[0].response.id)
    assert text_of(events) == stored.output_text == events[-1].response.output_text and stored.output_text
    assert stored.usage is not None and stored.usage.output_tokens > 0 and stored.usage.total_tokens == (
        stored.usage.input_tokens + stored.usage.output_tokens)

    # Cut after N events; the stored response runs on; resume on the other API process.
    stream = client.responses.create(model=stack.model, input=STORY, max_output_tokens=80, stream=True)
    head: list[Any] = []
    for event in stream:
        head.append(event)
        if sum(e.type == "response.output_text.delta" for e in head) == 5:
            break
    stream.close()
    cut = head[-1].sequence_number
    response_id = head[0].response.id
    began = time.monotonic()
    resumed = client_of(second_api).responses.retrieve(response_id, stream=True, starting_after=cut)
    tail = []
    first_after_s = None
    for event in resumed:
        if first_after_s is None:
            first_after_s = time.monotonic() - began
        tail.append(event)
    whole = head + tail
    print(f"cut after event {cut}; resumed on a second API process: first event after {first_after_s:.3f} s, "
          f"{len(tail)} more events")
    assert seqs(whole) == list(range(len(whole))), "a gap or a repeat"
    stored = client_of(second_api).responses.retrieve(response_id)
    assert text_of(whole) == stored.output_text and stored.status in ("completed", "incomplete")
    # Replayed from the start by either process, the events are the same ones.
    replay = list(client.responses.retrieve(response_id, stream=True))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in whole]


def test_background_response_polled_to_completed_then_deleted(stack: Stack, second_api: str) -> None:
    client = client_of(stack.v1)
    created = client.responses.create(model=stack.model, input="What is the capital of France?", temperature=0,
                                      max_output_tokens=30, background=True, metadata={"run": "e2e"},
                                      instructions="Answer in one sentence.")
    assert created.status == "queued" and created.background and created.output == []
    final, seen = wait_ended(client_of(second_api), created.id)
    print(f"background response: statuses polled {sorted(set(seen))}, answer {final.output_text!r}")
    assert final.status == "completed" and "Paris" in final.output_text and final.metadata == {"run": "e2e"}
    assert final.instructions == "Answer in one sentence." and final.completed_at and final.usage
    items = client.responses.input_items.list(created.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [  # type: ignore[union-attr,index]
        ("message", "user", "What is the capital of France?")]
    # Its end was counted once, by whichever process's keeper saw it.
    def counted() -> float:
        total = 0.0
        for v1 in (stack.v1, second_api):
            for line in httpx.get(v1.removesuffix("/v1") + "/metrics", timeout=10).text.splitlines():
                if line.startswith('llmq:responses_total{status="completed"}'):
                    total += float(line.split()[-1])
        return total

    wait_for(lambda: counted() >= 1, 10, "the end counted in /metrics")
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client_of(second_api).responses.retrieve(created.id)
    r = redis.Redis.from_url(stack.redis_url)
    assert not r.exists(f"llmq:response:{created.id}:events") and not r.hexists(f"llmq:response:{created.id}", "record")
    # Not stored: never shown, and gone from Redis soon after it ended.
    unstored = client.responses.create(model=stack.model, input="Hi", max_output_tokens=5, store=False)
    assert unstored.status in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=stack.model, input="Hi", background=True, store=False)
    assert err.value.body["param"] == "background"  # type: ignore[index]


def test_cancel_stops_a_background_response_within_a_step(stack: Stack) -> None:
    client = client_of(stack.v1)
    r = redis.Redis.from_url(stack.redis_url)
    created = client.responses.create(model=stack.model, input=STORY, max_output_tokens=2000, background=True,
                                      stream=True)
    events: list[Any] = []
    for event in created:
        events.append(event)
        if event.type == "response.output_text.delta":
            break
    response_id = events[0].response.id
    began = time.monotonic()
    cancelled = client.responses.cancel(response_id)
    took = time.monotonic() - began
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=events[-1].sequence_number))
    events += rest
    assert cancelled.status == "cancelled" and events[-1].response.status == "cancelled"
    assert seqs(events) == list(range(len(events)))
    assert client.responses.cancel(response_id).status == "cancelled"  # idempotent
    # The worker stopped: its stream gains nothing a moment later.
    key = f"llmq:response:{response_id}:events"
    time.sleep(1.0)
    length = r.xlen(key)
    time.sleep(1.5)
    print(f"cancel answered in {took:.3f} s after {text_of(events)!r}; stream length {length}, then {r.xlen(key)}")
    assert r.xlen(key) == length


def test_previous_response_id_continues_the_conversation_and_tool_calls(stack: Stack) -> None:
    client = client_of(stack.v1)
    r = redis.Redis.from_url(stack.redis_url)
    first = client.responses.create(model=stack.model, input="My name is Ada.", temperature=0, max_output_tokens=20,
                                    instructions="Be brief.")
    second = client.responses.create(model=stack.model, input="What is my name?", temperature=0,
                                     max_output_tokens=20, previous_response_id=first.id)
    messages = stored_job(r, second.id)["messages"]
    # The earlier input and answer go back through the template; the earlier instructions do not (as OpenAI).
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "My name is Ada."), ("assistant", first.output_text), ("user", "What is my name?")]
    assert second.previous_response_id == first.id and second.status in ("completed", "incomplete")
    print(f"two turns: {first.output_text!r} / {second.output_text!r}")
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=stack.model, input="Hi", previous_response_id="resp_nope")
    assert err.value.body == {"message": "Response with id 'resp_nope' not found.",
                              "type": "invalid_request_error", "param": "previous_response_id",
                              "code": "previous_response_not_found"}

    # A function call, then its output as the next turn's input.
    weather: Any = {"type": "function", "name": "get_weather", "description": "Weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    call_turn = client.responses.create(model=stack.model, input="What is the weather in Paris?", tools=[weather],
                                        tool_choice="required", temperature=0, max_output_tokens=60)
    calls = [o for o in call_turn.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    answer = client.responses.create(model=stack.model, previous_response_id=call_turn.id, tools=[weather],
                                     temperature=0, max_output_tokens=30, input=[
                                         {"type": "function_call_output", "call_id": calls[0].call_id,
                                          "output": "sunny, 21 C"}])
    messages = stored_job(r, answer.id)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == calls[0].call_id and messages[2]["tool_call_id"] == calls[0].call_id
    assert answer.status in ("completed", "incomplete") and answer.output_text
    # Streamed, the call comes as OpenAI streams it.
    streamed: list[Any] = list(client.responses.create(model=stack.model, input="Weather in Rome?", tools=[weather],
                                          tool_choice="required", temperature=0, max_output_tokens=60, stream=True))
    events = streamed
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    for item in events[-1].response.output:
        if item.type == "function_call":  # each call's pieces, by its item id, are its arguments
            args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                           and e.item_id == item.id)
            assert args == item.arguments and json.loads(args)["city"]


def test_structured_output_and_refusals(stack: Stack) -> None:
    client = client_of(stack.v1)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=stack.model, input="Describe a person.", max_output_tokens=200, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    assert r.status == "completed", r.output_text
    person = json.loads(r.output_text)
    assert set(person) == {"name", "age"} and r.text.format.type == "json_schema"  # type: ignore[union-attr]
    for extra, param in (({"reasoning": {"effort": "high"}}, "reasoning"),
                         ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
                         ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                          "input.0.content.0")):
        body = {"model": stack.model, "input": "hi", **extra}
        got = httpx.post(f"{stack.v1}/responses", json=body, timeout=30)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text
    too_long = httpx.post(f"{stack.v1}/responses", json={"model": stack.model, "input": "word " * 9000}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["param"] == "input"


def test_a_worker_killed_after_its_first_token_fails_the_response_and_before_it_resubmits(stack: Stack) -> None:
    model = "resp-crash"
    workers = [start_worker(stack.env, f"resp-crash-{c}", model_names=model, concurrency=2) for c in "abc"]
    r = redis.Redis.from_url(stack.redis_url)
    client = client_of(stack.v1, timeout=300)
    try:
        wait_for(lambda: cards(stack.base_url).get(model, {}).get("workers") == 3, 180, "three crash workers")

        # 1. Killed mid-answer: the response ends failed, with a clear error, never hanging.
        stream = client.responses.create(model=model, input=STORY, max_output_tokens=400, background=True,
                                         stream=True)
        events: list[Any] = []
        for event in stream:
            events.append(event)
            if sum(e.type == "response.output_text.delta" for e in events) == 3:
                break
        response_id = events[0].response.id
        proc_of(workers, claimer(r, response_id)).kill()
        killed = time.monotonic()
        for event in stream:
            events.append(event)
        waited = time.monotonic() - killed
        final: Any = events[-1]
        print(f"worker killed after {text_of(events[:10])!r}: '{final.response.error.message}' {waited:.2f} s later")
        assert final.type == "response.failed" and final.response.status == "failed"
        assert "stopped before it finished" in final.response.error.message
        assert seqs(events) == list(range(len(events))) and waited < 2 * HEARTBEAT_TTL_S + 2
        assert client.responses.retrieve(response_id).status == "failed"
        wait_for(lambda: cards(stack.base_url)[model]["workers"] == 2, HEARTBEAT_TTL_S + 2, "dead worker drops out")

        # 2. Killed after Started, before the first token (a long prompt's prefill): resubmitted, answered.
        stream = client.responses.create(model=model, input=LONG_PROMPT, max_output_tokens=8, background=True,
                                         stream=True)
        events = []
        for event in stream:
            events.append(event)
            if event.type == "response.in_progress":
                break
        response_id = events[0].response.id
        owner = claimer(r, response_id)
        proc_of(workers, owner).kill()
        events += list(stream)
        second_owner = claimer(r, f"{response_id}~1")
        print(f"long-prompt response started on {owner}, resubmitted to {second_owner}: {text_of(events)!r}")
        assert events[-1].response.status in ("completed", "incomplete") and text_of(events)
        assert second_owner and second_owner != owner and seqs(events) == list(range(len(events)))
        assert [e.type for e in events].count("response.in_progress") == 1
    finally:
        for w in workers:
            w.kill()


def test_a_worker_killed_before_it_started_the_job_costs_nothing(stack: Stack) -> None:
    """One worker holds after it claimed the job (tests/held_app.py):
    SIGKILLed there, the job runs on the spare worker (redelivery and claim
    takeover)."""
    model = "resp-hold"
    held = start_held_worker(stack.env, "resp-held", "after_claim", model_names=model, concurrency=2)
    spare = start_worker(stack.env, "resp-spare", model_names=model, concurrency=2)
    r = redis.Redis.from_url(stack.redis_url)
    client = client_of(stack.v1)
    held_key = hold_key("after_claim")
    r.delete(held_key)  # an earlier test's hold (tests/test_reliability_e2e.py) shares the stack's Redis
    try:
        wait_for(lambda: cards(stack.base_url).get(model, {}).get("workers") == 2, 180, "both workers")
        for attempt in range(30):  # Celery hands each job to whichever worker asks first
            created = client.responses.create(model=model, input=f"Say {attempt}.", max_output_tokens=8,
                                              temperature=0, background=True)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not r.exists(held_key):
                if client.responses.retrieve(created.id).status in ENDED:
                    break
                time.sleep(0.05)
            if r.exists(held_key):
                break
        else:
            pytest.fail("the held worker never took a job")
        assert r.get(held_key).decode() == created.id  # type: ignore[union-attr]
        held.kill()
        killed = time.monotonic()
        final, _ = wait_ended(client, created.id, 120)
        waited = time.monotonic() - killed
        print(f"held job {created.id} answered by {claimer(r, created.id)} {waited:.2f} s after the SIGKILL")
        assert final.status in ("completed", "incomplete") and final.output_text
        assert claimer(r, created.id).startswith(spare.name + "@") and waited < 2 * HEARTBEAT_TTL_S + 2
    finally:
        for w in (held, spare):
            w.kill()


def test_an_api_process_killed_mid_response_loses_nothing(stack: Stack) -> None:
    doomed, base = start_api(stack.env, name="api-responses-doomed")
    try:
        stream = client_of(f"{base}/v1").responses.create(model=stack.model, input=STORY, max_output_tokens=60,
                                                          background=True, stream=True)
        head: list[Any] = []
        for event in stream:
            head.append(event)
            if sum(e.type == "response.output_text.delta" for e in head) == 3:
                break
        doomed.kill()
        killed = time.monotonic()
        response_id = head[0].response.id
        client = client_of(stack.v1)
        tail = list(client.responses.retrieve(response_id, stream=True, starting_after=head[-1].sequence_number))
        whole = head + tail
        stored = client.responses.retrieve(response_id)
        print(f"API process SIGKILLed after {len(head)} events; resumed on another: {len(tail)} more events, "
              f"{time.monotonic() - killed:.2f} s to the end")
        assert seqs(whole) == list(range(len(whole))) and stored.status in ("completed", "incomplete")
        assert text_of(whole) == stored.output_text
    finally:
        doomed.kill()


def test_many_followers_share_one_redis_read(stack: Stack, second_api: str) -> None:
    """Twenty clients follow the same background response at once, through
    two API processes: each gets every event once, in order."""
    client = client_of(stack.v1)
    created = client.responses.create(model=stack.model, input=STORY, max_output_tokens=40, background=True)

    def follow(i: int) -> list[int]:
        c = client_of(stack.v1 if i % 2 else second_api)
        return seqs(list(c.responses.retrieve(created.id, stream=True)))

    with ThreadPoolExecutor(max_workers=20) as pool:
        got = list(pool.map(follow, range(20)))
    assert all(g == got[0] == list(range(len(got[0]))) for g in got) and len(got[0]) > 5
