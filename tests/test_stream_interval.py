"""FastChat's stream interval in the worker (``--stream-interval``: a choice's
first tokens at once, then a Delta every N tokens and at its end), over a
real Redis; and the API's coalescing: Deltas that wait behind each other
in a job's mailbox (a client that reads slower than tokens come) go out as
one."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import redis

from broker.schemas import Delta, Done, Job, Started, Timings, TokenLogprob, ToolCallDelta, Usage, parse_message
from broker.settings import Settings
from worker.engines.emitter import Emitter
from worker.engines.protocol import Update, choices_of
from worker.publish import Publisher
from worker.toolcalls import FORMATS


TIMINGS = Timings(queue_s=0.0, first_token_s=0.1, total_s=0.5)


def job(channel: str, n: int = 1) -> Job:
    return Job(job_id="j1", model="m", kind="chat", reply_channel=channel, submitted_at=time.time(), n=n)


def deltas_published(redis_url: str, interval: int, tokens: int, n: int = 1) -> list[Delta]:
    r = redis.Redis.from_url(redis_url)
    sub = r.pubsub()
    sub.subscribe("api-1")
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    emitter = Emitter(Publisher(r), FORMATS["generic"], stream_interval=interval)
    choices = choices_of(job("api-1", n), [1, 2, 3], tokens, 0.0)
    emitter.add(choices)
    for i in range(tokens):
        emitter.publish([Update(c, text=f"t{i} ", tokens=1, finish="length" if i == tokens - 1 else None)
                         for c in choices])
    emitter.publish([])  # the last step's replies are read back
    events = []
    while (m := sub.get_message(timeout=0.5)) is not None:
        events += parse_message(m["data"])
    assert all(c.ended.is_set() for c in choices)
    return [e for e in events if isinstance(e, Delta)]


def test_every_token_is_a_delta_by_default(redis_url: str) -> None:
    deltas = deltas_published(redis_url, 1, 7)
    assert [d.completion_tokens for d in deltas] == [1, 2, 3, 4, 5, 6, 7]


def test_an_interval_sends_the_first_token_at_once_then_every_n_and_the_end(redis_url: str) -> None:
    deltas = deltas_published(redis_url, 3, 8)
    assert [d.completion_tokens for d in deltas] == [1, 4, 7, 8]
    assert "".join(d.text for d in deltas) == "".join(f"t{i} " for i in range(8))
    assert [d.text for d in deltas][:2] == ["t0 ", "t1 t2 t3 "]
    two = deltas_published(redis_url, 4, 6, n=2)  # each choice keeps its own count
    assert sorted((d.index, d.completion_tokens) for d in two) == [(0, 1), (0, 5), (0, 6), (1, 1), (1, 5), (1, 6)]


def run_with(mailbox: list[object]) -> list[object]:
    """A RunningJob over a mailbox filled beforehand, as when its client fell behind."""
    from api.jobs.interactive import RunningJob

    async def main() -> list[object]:
        q: asyncio.Queue[object] = asyncio.Queue()
        for ev in mailbox:
            q.put_nowait(ev)
        jobs = SimpleNamespace(settings=Settings())
        run = RunningJob(job=job("api-1"), started=Started(job_id="j1", seq=0, worker="w", prompt_tokens=3,
                                                           queue_s=0.0),
                         _queue=q, _jobs=jobs, accepted_at=time.monotonic())  # type: ignore[arg-type]
        return [ev async for ev in run.events()]

    return asyncio.run(main())


def delta(seq: int, text: str, tokens: int, **more: object) -> Delta:
    return Delta(job_id="j1", seq=seq, index=0, text=text, completion_tokens=tokens, **more)  # type: ignore[arg-type]


def test_deltas_waiting_in_a_mailbox_go_out_as_one() -> None:
    lp = [TokenLogprob(token="a", logprob=-0.1)]
    done = Done(job_id="j1", seq=5, index=0, finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=4),
                timings=TIMINGS)
    out = run_with([delta(1, "a", 1, logprobs=lp), delta(2, "b", 2, logprobs=lp), delta(3, "c", 3, logprobs=lp),
                    delta(4, "d", 4, logprobs=lp), done])
    assert len(out) == 2 and out[1] == done
    merged = out[0]
    assert isinstance(merged, Delta)
    assert (merged.text, merged.completion_tokens, merged.seq, len(merged.logprobs or [])) == ("abcd", 4, 4, 4)


def test_tool_call_pieces_are_never_merged() -> None:
    call = ToolCallDelta(index=0, id="call_1", name="f", arguments="{")
    done = Done(job_id="j1", seq=4, index=0, finish_reason="tool_calls",
                usage=Usage(prompt_tokens=3, completion_tokens=3), timings=TIMINGS)
    out = run_with([delta(1, "a", 1), delta(2, "", 2, tool_calls=[call]), delta(3, "b", 3), done])
    assert [getattr(ev, "text", None) for ev in out] == ["a", "", "b", None]


def test_the_drain_rate_counts_jobs_not_choices(redis_url: str) -> None:
    """``Emitter.jobs_per_s``, which heartbeats carry for the API's Retry-After."""
    emitter = Emitter(Publisher(redis.Redis.from_url(redis_url)), FORMATS["generic"])
    assert emitter.jobs_per_s() == 0.0
    for jid, n in (("a", 3), ("b", 1)):
        choices = choices_of(job("api-1", n).model_copy(update={"job_id": jid}), [1, 2], 4, 0.0)
        emitter.add(choices)
        emitter.publish([Update(c, text="x", tokens=1, finish="stop") for c in choices])
    emitter.publish([])
    assert emitter.jobs_per_s() == 2 / 10  # two jobs ended in the 10 s window, four choices
