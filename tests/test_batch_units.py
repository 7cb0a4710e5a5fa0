"""Pure units of the worker's batch side: how a line's events are merged
before they are stored, and how many batch lines the gate lets a worker
hold. (The real Redis, Celery and API paths: tests/test_batches_e2e.py.)"""

from __future__ import annotations

import time

import pytest

from api.completions.answers import ChatShape, replay
from broker.schemas import (
    BatchLine,
    Delta,
    Done,
    Error,
    Job,
    LineResult,
    Message,
    Sampling,
    Started,
    Timings,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from worker import batchgate
from worker.batchgate import BatchGate
from worker.publish import merge


def _done(index: int, tokens: int) -> Done:
    return Done(job_id="j", seq=9, index=index, finish_reason="length", usage=Usage(prompt_tokens=5,
                completion_tokens=tokens), timings=Timings(queue_s=0, first_token_s=0.1, total_s=0.2))


def test_merge_keeps_one_delta_and_one_done_per_choice_in_order() -> None:
    lp = [TokenLogprob(token="a", logprob=-0.1)]
    events = [
        Started(job_id="j", seq=0, worker="w", prompt_tokens=5, queue_s=0.0),
        Delta(job_id="j", seq=1, index=1, text="x", completion_tokens=1),
        Delta(job_id="j", seq=2, index=0, text="He", completion_tokens=1, logprobs=lp),
        Delta(job_id="j", seq=3, index=0, text="llo", completion_tokens=2, logprobs=lp,
              tool_calls=[ToolCallDelta(index=0, id="call_1", name="f", arguments='{"a"')]),
        Delta(job_id="j", seq=4, index=0, text="", completion_tokens=3,
              tool_calls=[ToolCallDelta(index=0, arguments=": 1}")]),
        _done(1, 1), _done(0, 3),
    ]
    merged = merge(events)
    assert [type(e).__name__ for e in merged] == ["Started", "Delta", "Done", "Delta", "Done"]
    first = merged[1]
    assert isinstance(first, Delta) and first.index == 0 and first.text == "Hello" and first.completion_tokens == 3
    assert first.logprobs == lp + lp and [p.arguments for p in first.tool_calls or []] == ['{"a"', ": 1}"]
    assert events[2].text == "He"  # the originals are untouched
    # The API renders the merged events into the body the route would send.
    job = Job(job_id="j", model="m", kind="chat", messages=[Message(role="user", content="hi")], n=2,
              sampling=Sampling(), reply_channel="", submitted_at=0.0)

    class Line:
        job_id, created = "j", 1
    Line.job = job  # type: ignore[attr-defined]
    body = replay(Line(), ChatShape(), merged)  # type: ignore[arg-type]
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'} and body["choices"][1]["message"]["content"] == "x"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_an_error_or_a_skip_makes_a_line_failed() -> None:
    error = Error(job_id="j", seq=0, status=400, error_type="invalid_request_error", message="bad")
    assert LineResult(index=0, custom_id="c", job_id="j", events=[error], finished_at=0).failed
    assert LineResult(index=0, custom_id="c", job_id="j", skipped="batch_expired", finished_at=0).failed
    assert not LineResult(index=0, custom_id="c", job_id="j", events=[_done(0, 1)], finished_at=0).failed
    line = BatchLine(batch_id="b", index=0, custom_id="c", expires_at=time.time())
    assert Job(job_id="j", model="m", kind="chat", reply_channel="", submitted_at=0, batch=line).summary()[
        "custom_id"] == "c"


def test_the_gate_leaves_interactive_work_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(batchgate.time, "monotonic", lambda: clock[0])
    gate = BatchGate(["llmq-batch.m"], threads=16, reserve=2)
    assert gate.room() == 14  # idle: all but the reserve
    for _ in range(10):
        gate.held(batch=True)
    assert gate.room() == 4
    for _ in range(6):
        gate.held(batch=False)
    assert gate.room() == -2  # over: no more batch lines until some end
    for _ in range(6):
        gate.released(batch=False)
    clock[0] += 1
    assert gate.room() == -2  # interactive clients come back within moments: their threads stay theirs
    clock[0] += batchgate.MEMORY_S + 0.1
    assert gate.room() == 4
    for _ in range(10):
        gate.released(batch=True)
    assert gate.room() == 14
    assert BatchGate([], threads=2, reserve=2).room() == 1  # a small worker still runs batch lines
