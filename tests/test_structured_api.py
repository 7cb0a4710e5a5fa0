"""Unit tests of the API half of structured outputs and tool calling: request
forms and their 400s, the job fields they map to, and the response shapes of
tool calls (checked against the openai package's own types). No Redis, no
workers: requests go through the real app with a stand-in job service."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import openai.types.chat as oa
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.completions.answers import ChatShape, ChoiceResult, CompletionShape, Shape, collect, stream, usage_info
from api.completions.protocol import ChatCompletionRequest, CompletionRequest
from api.errors import APIError
from api.jobs.interactive import Restarted, RunningJob
from broker.schemas import (
    Constraint,
    Delta,
    Done,
    Error,
    Job,
    Message,
    Sampling,
    Started,
    Timings,
    Tool,
    ToolCallDelta,
    Usage,
)
from broker.settings import Settings

USER = [{"role": "user", "content": "weather in Paris?"}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather",
           "parameters": CITY}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, **extra}


# ------------------------------------------------------------ request -> job


class _Submitted(Exception):
    """Raised by the stand-in job service: the route got as far as submitting."""


class FakeJobs:
    """Records what a route submits, then stops the request there."""

    def __init__(self) -> None:
        self.kwargs: dict[str, Any] = {}

    async def submit(self, job: Job, **kwargs: Any) -> RunningJob:
        self.kwargs = {**{name: getattr(job, name) for name in job.model_fields_set}, **kwargs}
        raise APIError(503, "stand-in job service", code="submitted")


@pytest.fixture(scope="module")
def api() -> tuple[TestClient, FakeJobs]:
    # No `with`: the lifespan (Redis, Celery) never starts; routes, errors and dependencies are real.
    app = create_app(Settings(api_keys=[]))
    jobs = FakeJobs()
    app.state.interactive = jobs
    return TestClient(app), jobs


def submitted(api: tuple[TestClient, FakeJobs], path: str, body: dict[str, Any]) -> dict[str, Any]:
    client, jobs = api
    r = client.post(path, json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "submitted", r.text
    # What reached the route is what the worker gets: it must form a valid Job.
    Job(job_id="j", reply_channel="c", submitted_at=0.0, **{k: v for k, v in jobs.kwargs.items()
                                                            if k in Job.model_fields
                                                            and k not in ("job_id", "reply_channel", "submitted_at")})
    return jobs.kwargs


def refused(api: tuple[TestClient, FakeJobs], path: str, body: dict[str, Any]) -> tuple[str | None, str]:
    """The param and message of the 400 the request gets, in OpenAI's error shape."""
    r = api[0].post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error["param"], error["message"]


def test_plain_chat_gets_no_constraint_and_no_tools(api: tuple[TestClient, FakeJobs]) -> None:
    got = submitted(api, "/v1/chat/completions", chat())
    assert got["constraint"] is None and got["tools"] is None
    assert (got["tool_choice"], got["tool_name"], got["parallel_tool_calls"]) == ("none", None, True)
    assert submitted(api, "/v1/chat/completions", chat(response_format={"type": "text"}))["constraint"] is None


@pytest.mark.parametrize(("response_format", "schema"), [
    ({"type": "json_object"}, None),
    ({"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True}},
     {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "anything", "description": "no schema given"}}, {}),
])
def test_response_format_maps_to_a_json_constraint(api: tuple[TestClient, FakeJobs], response_format: dict[str, Any],
                                                   schema: dict[str, Any] | None) -> None:
    got = submitted(api, "/v1/chat/completions", chat(response_format=response_format))
    assert got["constraint"] == Constraint(kind="json", json_schema=schema, param="response_format")


@pytest.mark.parametrize(("outputs", "constraint"), [
    ({"choice": ["yes", "no"]}, Constraint(kind="choice", choices=["yes", "no"], param="structured_outputs")),
    ({"regex": r"\d{3}"}, Constraint(kind="regex", pattern=r"\d{3}", param="structured_outputs")),
    ({"json": {"type": "array"}}, Constraint(kind="json", json_schema={"type": "array"}, param="structured_outputs")),
    ({"json": '{"type": "array"}'}, Constraint(kind="json", json_schema={"type": "array"}, param="structured_outputs")),
    ({"grammar": 'root ::= "a"+'}, Constraint(kind="grammar", ebnf='root ::= "a"+', param="structured_outputs")),
])
def test_structured_outputs_on_both_routes(api: tuple[TestClient, FakeJobs], outputs: dict[str, Any],
                                           constraint: Constraint) -> None:
    assert submitted(api, "/v1/chat/completions", chat(structured_outputs=outputs))["constraint"] == constraint
    got = submitted(api, "/v1/completions", {"model": "m", "prompt": "x", "structured_outputs": outputs})
    assert got["constraint"] == constraint and "tools" not in got


@pytest.mark.parametrize(("extra", "mode", "name", "parallel"), [
    ({}, "auto", None, True),
    ({"tool_choice": "auto", "parallel_tool_calls": False}, "auto", None, False),
    ({"tool_choice": "required"}, "required", None, True),
    ({"tool_choice": "none"}, "none", None, True),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "function", "get_time", True),
])
def test_tools_and_tool_choice_map_to_the_job(api: tuple[TestClient, FakeJobs], extra: dict[str, Any], mode: str,
                                              name: str | None, parallel: bool) -> None:
    got = submitted(api, "/v1/chat/completions", chat(tools=[WEATHER, CLOCK], **extra))
    assert got["tools"] == [Tool.model_validate(WEATHER), Tool.model_validate(CLOCK)]
    assert (got["tool_choice"], got["tool_name"], got["parallel_tool_calls"]) == (mode, name, parallel)
    assert got["constraint"] is None


def test_a_constraint_is_fine_beside_tools_that_are_off(api: tuple[TestClient, FakeJobs]) -> None:
    got = submitted(api, "/v1/chat/completions", chat(tools=[WEATHER], tool_choice="none",
                                                      response_format={"type": "json_object"}))
    assert got["constraint"].kind == "json" and got["tool_choice"] == "none"


def test_tool_conversation_maps_to_messages(api: tuple[TestClient, FakeJobs]) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
                {"role": "assistant", "content": "It is sunny.", "tool_calls": []}, {"role": "assistant"}]
    got = submitted(api, "/v1/chat/completions", chat(messages=messages, tools=[WEATHER]))
    assert got["messages"] == [
        Message(role="user", content="weather in Paris?"),
        Message.model_validate({"role": "assistant", "content": "", "tool_calls": [call]}),
        Message(role="tool", content="sunny", tool_call_id="call_1"),
        Message(role="assistant", content="It is sunny."),
        Message(role="assistant", content=""),
    ]


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice.1"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": 3}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "whitespace": " "}}, "structured_outputs.whitespace"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
    ({"response_format": SCHEMA_FORMAT, "tools": [WEATHER]}, "response_format"),
    ({"structured_outputs": {"regex": "a"}, "tools": [WEATHER], "tool_choice": "required"}, "structured_outputs"),
    ({"tools": []}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools.0.function.parameters"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": {"type": "function"}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"parallel_tool_calls": "sometimes"}, "parallel_tool_calls"),
    ({"messages": [*USER, {"role": "tool", "content": "sunny"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "tool_calls": [{"id": "c", "type": "function",
                                                    "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_forms_are_400_naming_the_param(api: tuple[TestClient, FakeJobs], extra: dict[str, Any],
                                            param: str) -> None:
    got, message = refused(api, "/v1/chat/completions", chat(**extra))
    assert got == param
    assert param.split(".")[0] in message


def test_constraint_beside_tools_says_why(api: tuple[TestClient, FakeJobs]) -> None:
    _, message = refused(api, "/v1/chat/completions", chat(response_format=SCHEMA_FORMAT, tools=[WEATHER]))
    assert "tool_choice" in message and "same" in message


def test_completions_take_no_chat_only_fields(api: tuple[TestClient, FakeJobs]) -> None:
    for extra, param in (({"tools": [WEATHER]}, "tools"), ({"response_format": {"type": "json_object"}},
                                                              "response_format"),
                         ({"structured_outputs": {"json": "nope"}}, "structured_outputs.json")):
        assert refused(api, "/v1/completions", {"model": "m", "prompt": "x", **extra})[0] == param


def test_models_convert_without_the_app() -> None:
    """The protocol methods routes use, called directly."""
    req = ChatCompletionRequest.model_validate(chat(tools=[CLOCK], tool_choice="required", parallel_tool_calls=False))
    assert req.tool_fields() == {"tools": [Tool.model_validate(CLOCK)], "tool_choice": "required",
                                 "tool_name": None, "parallel_tool_calls": False}
    assert req.constraint() is None
    comp = CompletionRequest.model_validate({"model": "m", "prompt": "x", "structured_outputs": {"choice": ["a"]}})
    assert comp.constraint() == Constraint(kind="choice", choices=["a"], param="structured_outputs")
    with pytest.raises(APIError) as err:
        ChatCompletionRequest.model_validate(chat(tool_choice={"type": "function", "function": {"name": "f"}}))
    assert (err.value.status, err.value.param) == (400, "tool_choice")


def test_openapi_schema_still_builds(api: tuple[TestClient, FakeJobs]) -> None:
    schema = api[0].get("/openapi.json").json()["components"]["schemas"]
    assert "tool_calls" in schema["ChatMessageOut"]["properties"]
    assert "structured_outputs" in schema["CompletionRequest"]["properties"]


# ------------------------------------------------------------ events -> response


def running(n: int = 1, logprobs: int | None = None) -> RunningJob:
    job = Job(job_id="chatcmpl-1", model="m", kind="chat", messages=[Message(role="user", content="x")], n=n,
              sampling=Sampling(logprobs=logprobs), reply_channel="c", submitted_at=time.time())
    started = Started(job_id=job.job_id, seq=0, worker="w", prompt_tokens=5, queue_s=0.0)
    return RunningJob(job=job, started=started, _queue=asyncio.Queue(), _jobs=None,  # type: ignore[arg-type]
                      accepted_at=time.monotonic())


def delta(text: str = "", *calls: ToolCallDelta, index: int = 0, tokens: int = 1) -> Delta:
    return Delta(job_id="chatcmpl-1", seq=1, index=index, text=text, completion_tokens=tokens,
                 tool_calls=list(calls) or None)


def done(reason: str = "tool_calls", index: int = 0, tokens: int = 4) -> Done:
    return Done(job_id="chatcmpl-1", seq=9, index=index, finish_reason=reason,  # type: ignore[arg-type]
                usage=Usage(prompt_tokens=5, completion_tokens=tokens),
                timings=Timings(queue_s=0.0, first_token_s=0.1, total_s=0.2))


TWO_CALLS = [
    delta("\n"),
    delta("", ToolCallDelta(index=0, id="call_a", name="get_weather")),
    delta("", ToolCallDelta(index=0, arguments='{"city": ')),
    delta("", ToolCallDelta(index=0, arguments='"Paris"}'), ToolCallDelta(index=1, id="call_b", name="get_time")),
    delta("", ToolCallDelta(index=1, arguments="{}")),
]


def test_tool_call_pieces_collect_by_index() -> None:
    c = ChoiceResult(index=0)
    for ev in TWO_CALLS:
        c.add(ev)
    assert [(t.id, t.function.name, t.function.arguments) for t in c.tool_calls()] == [
        ("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_time", "{}")]
    assert c.text == "\n"


def test_body_with_calls_parses_as_openai_chat_completion() -> None:
    calls, plain = ChoiceResult(index=0, finish_reason="tool_calls"), ChoiceResult(index=1, text="Hi.")
    for ev in TWO_CALLS:
        calls.add(ev)
    body = ChatShape().body(running(n=2), [calls, plain], usage_info(5, 4))
    assert body["choices"][0]["message"] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_a", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                       {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    # Without calls the message is exactly what it was before tools existed.
    assert body["choices"][1]["message"] == {"role": "assistant", "content": "Hi."}
    parsed = oa.ChatCompletion.model_validate(body)
    assert parsed.choices[0].finish_reason == "tool_calls"
    call = parsed.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    assert parsed.choices[1].message.tool_calls is None and parsed.choices[1].message.content == "Hi."


def test_text_beside_calls_is_kept() -> None:
    c = ChoiceResult(index=0)
    c.add(delta("Let me look.", ToolCallDelta(index=0, id="call_a", name="get_time", arguments="{}")))
    assert ChatShape.message(c).content == "Let me look."


def test_stream_chunks_parse_as_openai_chunks() -> None:
    run, shape = running(), ChatShape()
    texts = [shape.first(run, 0), *(shape.delta(run, ev) for ev in TWO_CALLS), shape.final(run, done())]
    chunks = [json.loads(t) for t in texts]  # streamed chunks come as the JSON text sent
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[1] == {"content": "\n"}
    assert deltas[2] == {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                         "function": {"name": "get_weather", "arguments": ""}}]}
    assert deltas[3] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}
    assert [p.get("id") for p in deltas[4]["tool_calls"]] == [None, "call_b"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    parsed = [oa.ChatCompletionChunk.model_validate(c) for c in chunks]
    args = "".join(p.function.arguments or "" for c in parsed for p in c.choices[0].delta.tool_calls or []
                   if p.index == 0 and p.function is not None)
    assert args == '{"city": "Paris"}'
    mixed = shape.delta(run, delta("ok", ToolCallDelta(index=0, id="call_c", name="get_time")))
    assert set(oa.ChatCompletionChunk.model_validate_json(mixed).choices[0].delta.model_dump(exclude_none=True)) == {
        "content", "tool_calls"}


class ScriptedRun(RunningJob):
    """A running job whose events are a fixed list."""

    script: list[Delta | Done | Error] = []

    async def events(self, *, client_saw_tokens: bool = True) -> AsyncIterator[Delta | Done | Error | Restarted]:
        for ev in self.script:
            yield ev
        self.finished = True

    async def close(self) -> None:
        return None


def scripted(events: list[Delta | Done | Error]) -> ScriptedRun:
    base = running()
    run = ScriptedRun(job=base.job, started=base.started, _queue=base._queue, _jobs=None,  # type: ignore[arg-type]
                      accepted_at=base.accepted_at)
    run.script = events
    return run


def _data(event: bytes) -> str:
    """The data of one framed SSE event."""
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return event[6:-2].decode()


def test_collect_and_stream_carry_tool_calls() -> None:
    events: list[Delta | Done | Error] = [*TWO_CALLS, done()]

    async def both() -> tuple[dict[str, Any], list[str]]:
        body = await collect(scripted(events), ChatShape())
        shape: Shape = ChatShape()
        sent = [_data(e) async for e in stream(scripted(events), shape, include_usage=False)]
        return body, sent

    body, sent = asyncio.run(both())
    message = oa.ChatCompletion.model_validate(body).choices[0].message
    assert message.content is None and [t.id for t in message.tool_calls or []] == ["call_a", "call_b"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert sent[-1] == "[DONE]" and len(sent) == 1 + len(TWO_CALLS) + 1 + 1
    for data in sent[:-1]:
        oa.ChatCompletionChunk.model_validate_json(data)


def test_completion_body_is_unchanged_by_tools() -> None:
    c = ChoiceResult(index=0, text="abc")
    body = CompletionShape().body(running(), [c], usage_info(5, 4))
    assert body["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "stop"}
