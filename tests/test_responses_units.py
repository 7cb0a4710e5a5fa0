"""Pure units of the Responses API: the fold that rebuilds a response and
its OpenAI events from its stream's entries (api/responses/events.py), the
request's validation and its input items as chat messages
(api/responses/protocol.py), and the compare-and-append of the API's marks
against a real redis-server. (The whole path: tests/test_responses_e2e.py.)"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, get_args

import pytest
import redis.asyncio as aioredis
from openai.types.responses import Response, ResponseStreamEvent

from api.errors import APIError
from api.responses.events import API_FIELD, EVENT_FIELD, Entry, Mark, ResponseFold, fold
from api.responses.items import to_messages
from api.responses.protocol import ResponseCreateRequest, StoredResponse
from api.responses.store import ResponseStore
from broker.keys import Keys
from broker.schemas import AnyEvent, Delta, Done, Error, Started, Timings, ToolCallDelta, Usage
from broker.settings import Settings

# The SDK's event classes by their type (its union is discriminated by its own machinery, not pydantic's).
EVENT_CLASSES = {get_args(cls.model_fields["type"].annotation)[0]: cls
                 for cls in get_args(get_args(ResponseStreamEvent)[0])}
RID = "resp_0123456789abcdef"


def record(background: bool = False, **request: Any) -> StoredResponse:
    body = ResponseCreateRequest.model_validate({"model": "m", "input": "Hi", "background": background, **request})
    job = body.job(RID, to_messages(body.items()), "stream", 0.0)
    return StoredResponse(id=RID, created_at=1_700_000_000, model="m", background=background, store=body.store,
                          echo=body.echo(), input_items=body.listed_items(), job=job, context_start=0)


class Stream:
    """Entries as a job's stream would hold them, with increasing ids."""

    def __init__(self, job_id: str = RID) -> None:
        self.job_id = job_id
        self.entries: list[Entry] = []
        self._ids = itertools.count()
        self._seq = itertools.count()

    def _id(self) -> str:
        n = next(self._ids)
        return f"{1_700_000_001_000 + n}-0"

    def add(self, ev: AnyEvent) -> Stream:
        self.entries.append((self._id(), {EVENT_FIELD: ev.model_dump_json()}))
        return self

    def mark(self, mark: Mark) -> Stream:
        self.entries.append((self._id(), {API_FIELD: mark.model_dump_json(exclude_none=True)}))
        return self

    def started(self, worker: str = "w1", job_id: str | None = None) -> Stream:
        return self.add(Started(job_id=job_id or self.job_id, seq=next(self._seq), worker=worker, prompt_tokens=7,
                                queue_s=0.1))

    def delta(self, text: str = "", tokens: int = 1, calls: list[ToolCallDelta] | None = None,
              job_id: str | None = None) -> Stream:
        return self.add(Delta(job_id=job_id or self.job_id, seq=next(self._seq), text=text, completion_tokens=tokens,
                              tool_calls=calls))

    def done(self, reason: Any = "stop", tokens: int = 3, job_id: str | None = None) -> Stream:
        return self.add(Done(job_id=job_id or self.job_id, seq=next(self._seq), finish_reason=reason,
                             usage=Usage(prompt_tokens=7, completion_tokens=tokens),
                             timings=Timings(queue_s=0.1, first_token_s=0.2, total_s=0.5)))


def check_shapes(events: list[dict[str, Any]], state: ResponseFold) -> None:
    """Every event and the final object validate against the openai SDK's own models."""
    for ev in events:
        EVENT_CLASSES[ev["type"]].model_validate(ev)
    Response.model_validate(state.response())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


def test_a_text_answer_folds_into_openai_events_numbered_from_0() -> None:
    s = Stream().started().delta("Hel", 1).delta("lo", 2).delta(" world", 3).done("stop", 3)
    state, events = fold(record(), s.entries)
    check_shapes(events, state)
    assert types(events) == ["created", "in_progress", "output_item.added", "content_part.added",
                             "output_text.delta", "output_text.delta", "output_text.delta", "output_text.done",
                             "content_part.done", "output_item.done", "completed"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas == "Hello world" == final["output"][0]["content"][0]["text"] == state.response()["output"][0][
        "content"][0]["text"]
    assert final["status"] == "completed" and final["usage"] == {
        "input_tokens": 7, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 10}
    assert final["completed_at"] == pytest.approx(1_700_000_001.004)
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["usage"] is None
    item_ids = {e.get("item_id") for e in events if "item_id" in e}
    assert item_ids == {final["output"][0]["id"]}


def test_the_fold_is_the_same_whole_or_entry_by_entry_and_on_every_process() -> None:
    s = Stream().started().delta("a", 1).delta("b", 2).done()
    _, whole = fold(record(), s.entries)
    again = ResponseFold(record())
    piecewise = again.opening()
    for entry_id, fields in s.entries:
        piecewise += again.feed(entry_id, fields)
    assert piecewise == whole == fold(record(), s.entries)[1]
    # Resuming after N means exactly the events numbered N+1...
    n = 4
    assert [e for e in whole if e["sequence_number"] > n] == whole[n + 1:]


def test_background_starts_queued_and_incomplete_at_max_output_tokens() -> None:
    s = Stream().started().delta("one two", 2).done("length", 2)
    state, events = fold(record(background=True, max_output_tokens=2), s.entries)
    check_shapes(events, state)
    assert events[0]["response"]["status"] == "queued" and events[1]["response"]["status"] == "in_progress"
    final = state.response()
    assert events[-1]["type"] == "response.incomplete" and final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete" and final["max_output_tokens"] == 2
    assert final["completed_at"] is None and final["usage"]["output_tokens"] == 2


def test_before_any_entry_the_object_is_queued_with_the_request_echoed() -> None:
    rec = record(background=True, instructions="Be brief.", temperature=0.5, metadata={"k": "v"},
                 service_tier="flex", text={"format": {"type": "json_object"}})
    state = ResponseFold(rec)
    r = state.response()
    Response.model_validate(r)
    assert r["status"] == "queued" and r["output"] == [] and r["usage"] is None
    assert (r["instructions"], r["temperature"], r["metadata"], r["service_tier"]) == ("Be brief.", 0.5, {"k": "v"},
                                                                                      "flex")
    assert r["text"] == {"format": {"type": "json_object"}, "verbosity": "medium"}
    assert rec.job.constraint is not None and rec.job.constraint.kind == "json" and rec.job.priority == 6


def test_a_tool_call_streams_as_a_function_call_item_and_whitespace_opens_no_message() -> None:
    s = (Stream().started().delta("\n", 1)
         .delta("", 5, [ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"city": ')])
         .delta("", 7, [ToolCallDelta(index=0, arguments='"Paris"}')])
         .delta("\n", 8).done("tool_calls", 8))
    state, events = fold(record(tools=[{"type": "function", "name": "get_weather"}]), s.entries)
    check_shapes(events, state)
    assert types(events) == ["created", "in_progress", "output_item.added", "function_call_arguments.delta",
                             "function_call_arguments.delta", "function_call_arguments.done", "output_item.done",
                             "completed"]
    out = state.response()["output"]
    assert out == [{"id": out[0]["id"], "type": "function_call", "status": "completed", "call_id": "call_1",
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    turn = state.assistant_turn()
    assert turn is not None and turn.content == "" and turn.tool_calls is not None
    assert turn.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_text_then_a_call_closes_the_message_first() -> None:
    s = (Stream().started().delta("Let me look.", 3)
         .delta("", 5, [ToolCallDelta(index=0, id="call_9", name="f", arguments="{}")]).done("tool_calls", 5))
    state, events = fold(record(tools=[{"type": "function", "name": "f"}]), s.entries)
    check_shapes(events, state)
    assert types(events)[2:] == ["output_item.added", "content_part.added", "output_text.delta", "output_text.done",
                                 "content_part.done", "output_item.done", "output_item.added",
                                 "function_call_arguments.delta", "function_call_arguments.done",
                                 "output_item.done", "completed"]
    assert [i["type"] for i in state.response()["output"]] == ["message", "function_call"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1]


def test_a_whitespace_answer_without_calls_is_still_a_message() -> None:
    state, events = fold(record(), Stream().started().delta(" ", 1).done().entries)
    check_shapes(events, state)
    assert state.output_text() == " " and types(events)[-1] == "completed"


def test_an_error_fails_the_response_with_the_request_s_param_names() -> None:
    err = Error(job_id=RID, seq=0, status=400, error_type="invalid_request_error", code="context_length_exceeded",
                param="messages", message="too long")
    state, events = fold(record(), Stream().add(err).entries)
    check_shapes(events, state)
    assert types(events) == ["created", "failed"]
    assert state.error == {"code": "invalid_prompt", "message": "too long"}
    assert (state.error_code, state.error_status, state.error_param, state.worker) == (
        "context_length_exceeded", 400, "input", None)


def test_the_first_terminal_entry_wins() -> None:
    s = Stream().started().delta("partial", 1).mark(Mark(kind="cancelled")).delta(" more", 2).done()
    state, events = fold(record(background=True), s.entries)
    check_shapes(events, state)
    assert types(events)[-4:] == ["output_text.done", "content_part.done", "output_item.done", "failed"]
    final = events[-1]["response"]
    assert final["status"] == "cancelled" == state.status and final["error"] is None
    assert state.output_text() == "partial" and final["output"][0]["status"] == "incomplete"
    failed = Stream().started().delta("x", 1).mark(Mark(kind="failed", code="worker_lost", message="gone",
                                                         status=502)).done()
    state, _ = fold(record(), failed.entries)
    assert state.status == "failed" and state.error == {"code": "server_error", "message": "gone"}
    assert (state.error_code, state.error_status) == ("worker_lost", 502)


def test_after_a_resubmit_only_the_new_job_counts() -> None:
    s = Stream().started("w1")
    s.mark(Mark(kind="resubmitted", job_id=f"{RID}~1"))
    s.delta("late", 1)  # the old attempt, too late: ignored
    s.started("w2", job_id=f"{RID}~1").delta("fresh", 1, job_id=f"{RID}~1").done(job_id=f"{RID}~1")
    state, events = fold(record(), s.entries)
    check_shapes(events, state)
    assert types(events).count("in_progress") == 1 and state.output_text() == "fresh"
    assert (state.attempts, state.job_id, state.worker) == (1, f"{RID}~1", "w2")
    # Never after a token: the client has the first attempt's text.
    late = Stream().started("w1").delta("kept", 1).mark(Mark(kind="resubmitted", job_id=f"{RID}~1"))
    late.started("w2", job_id=f"{RID}~1").delta("dropped", 1, job_id=f"{RID}~1")
    state, _ = fold(record(), late.entries)
    assert (state.attempts, state.job_id, state.output_text()) == (0, RID, "kept")


def test_what_the_keeper_reads_from_the_fold() -> None:
    state = ResponseFold(record())
    s = Stream().started("w7")
    for entry_id, fields in s.entries:
        state.feed(entry_id, fields)
    assert state.worker == "w7" and not state.had_delta and state.last_id == s.entries[-1][0]
    assert state.job_since_ms == 1_700_000_000_000 and state.last_ms == 1_700_000_001_000
    s.delta("x")
    state.feed(*s.entries[-1])
    assert state.had_delta and not state.ended


def test_input_items_become_chat_messages() -> None:
    body = ResponseCreateRequest.model_validate({"model": "m", "input": [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "function_call", "call_id": "c3", "name": "w", "arguments": "{}"},
    ]})
    msgs = to_messages(body.items())
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert msgs[1].content == "Weather ?" and msgs[2].content == "Checking."
    assert [c.id for c in msgs[2].tool_calls or []] == ["c1", "c2"]
    assert (msgs[3].tool_call_id, msgs[4].content) == ("c1", "rain")
    assert msgs[5].tool_calls and msgs[5].tool_calls[0].id == "c3"
    listed = body.listed_items()
    assert [i["type"] for i in listed] == ["message"] * 3 + ["function_call"] * 2 + ["function_call_output"] * 2 + [
        "function_call"]
    assert len({i["id"] for i in listed}) == len(listed)


@pytest.mark.parametrize(("extra", "param"), [
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True, "store": False}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}, "tools": [{"type": "function", "name": "f"}]},
     "tool_choice"),
    ({"tool_choice": {"type": "function", "name": "g"}, "tools": [{"type": "function", "name": "f"}]},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input.0.content.0"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"text": {"format": {"type": "json_object"}}, "tools": [{"type": "function", "name": "f"}]}, "text.format"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
])
def test_what_is_not_honoured_is_a_400_naming_it(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as err:
        ResponseCreateRequest.model_validate({"model": "m", "input": "hi", **extra})
    assert err.value.status == 400 and err.value.param == param, err.value.message


def test_neutral_values_of_refused_fields_are_fine() -> None:
    body = ResponseCreateRequest.model_validate({"model": "m", "input": "hi", "truncation": "disabled", "include": [],
                                                 "reasoning": None, "parallel_tool_calls": False,
                                                 "tools": [{"type": "function", "name": "f", "parameters": {}}],
                                                 "tool_choice": {"type": "function", "name": "f"}})
    job = body.job("j", [], "s", 0.0)
    assert (job.tool_choice, job.tool_name, job.parallel_tool_calls) == ("function", "f", False)
    assert body.echo()["tool_choice"] == {"type": "function", "name": "f"}


def test_a_mark_lands_only_on_the_entries_its_keeper_saw(redis_url: str) -> None:
    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        store = ResponseStore(r, Keys("units:"), Settings(redis_url=redis_url))
        try:
            first = await store.append("resp_x", Mark(kind="resubmitted", job_id="j~1"), if_last="0-0")
            assert first is not None
            assert await store.append("resp_x", Mark(kind="failed", code="c"), if_last="0-0") is None  # stale view
            second = await store.append("resp_x", Mark(kind="failed", code="c"), if_last=first)
            assert second is not None
            assert await store.append("resp_x", Mark(kind="cancelled")) is not None  # unconditional
            assert [e[0] for e in await store.entries("resp_x")][:2] == [first, second]
            assert await store.entries("resp_x", after=second) and 0 < await r.ttl("units:response:resp_x:events")
        finally:
            await r.aclose()

    asyncio.run(run())
