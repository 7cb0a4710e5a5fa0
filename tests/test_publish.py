"""The worker's Publisher against a real redis-server: a streamed job's
events land in its Redis stream (capped, with a TTL) in the same pipeline as
the publish, and count as heard even when no API process subscribes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.schemas import Delta, Started, parse_event, parse_message
from tests.procs import start_redis
from broker.schemas import STREAM_EVENT_FIELD as STREAM_FIELD
from worker.publish import UNREAD_MAX, Publisher


@pytest.fixture(scope="module")
def r(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    proc, port = start_redis(Path(tmp_path_factory.mktemp("redis-publish")))
    try:
        yield redis.Redis(port=port)
    finally:
        proc.stop()


def test_streamed_events_are_appended_capped_and_expire(r: redis.Redis) -> None:
    pub = Publisher(r, stream_max_events=100, stream_ttl_s=120)
    pub.stream("a", "llmq:test:stream:a")
    sub = r.pubsub()
    sub.subscribe("chan")
    events = [("chan", Started(job_id="a", seq=0, worker="w", prompt_tokens=3, queue_s=0.0)),
              ("", Delta(job_id="a", seq=1, text="hi", completion_tokens=1)),
              ("chan", Delta(job_id="b", seq=1, text="not streamed", completion_tokens=1))]
    counts = pub.publish(events)
    assert counts == [1, 1, 1]  # a subscriber heard "chan"; the channel-less streamed event counts as heard
    assert pub.publish([("nobody", Delta(job_id="b", seq=2, text="x", completion_tokens=2))]) == [0]
    stored = [parse_event(fields[STREAM_FIELD.encode()]) for _, fields in r.xrange("llmq:test:stream:a")]
    assert [e.seq for e in stored] == [0, 1] and all(e.job_id == "a" for e in stored)
    assert 0 < r.ttl("llmq:test:stream:a") <= 120
    for i in range(2, 400):
        pub.publish([("", Delta(job_id="a", seq=i, text=".", completion_tokens=i))])
    assert r.xlen("llmq:test:stream:a") < 250  # capped (approximately, as XADD MAXLEN ~ trims)
    pub.unstream("a")
    pub.publish([("", Delta(job_id="a", seq=400, text=".", completion_tokens=400))])
    last = parse_event(r.xrevrange("llmq:test:stream:a", count=1)[0][1][STREAM_FIELD.encode()])
    assert last.seq == 399


def test_sent_events_are_published_and_an_unheard_job_is_named_on_a_later_call(r: redis.Redis) -> None:
    """``send`` does not wait for Redis: the replies of one call are read on
    a later one, which names the jobs whose events no subscriber heard to
    the ``on_unheard`` handler."""
    pub = Publisher(r)
    told: list[set[str]] = []
    pub.on_unheard(told.append)
    sub = r.pubsub()
    sub.subscribe("heard")
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    first = [("heard", Delta(job_id="a", seq=1, text="x", completion_tokens=1)),
             ("nobody", Delta(job_id="b", seq=1, text="y", completion_tokens=1))]
    pub.send(first)
    pub.send([("heard", Delta(job_id="a", seq=2, text="z", completion_tokens=2))])
    assert told == []  # nothing read back yet
    for seq in range(3, 3 + UNREAD_MAX):  # the replies are read back once UNREAD_MAX wait
        pub.send([("heard", Delta(job_id="a", seq=seq, text=".", completion_tokens=seq))])
        if told:
            break
    assert told == [{"b"}]
    got = [sub.get_message(timeout=1) for _ in range(seq)]
    assert [parse_event(m["data"]).seq for m in got if m] == list(range(1, seq + 1))
    # A waiting publish reads the replies still unread before its own.
    assert pub.publish([("nobody", Delta(job_id="c", seq=1, text=".", completion_tokens=1))]) == [0]
    pub.send([])
    assert told == [{"b"}]  # job a's last event was heard
    pub.close()


def test_a_jobs_started_mark_goes_before_its_started_event_in_the_same_write(r: redis.Redis) -> None:
    """The worker marks a job started (``started_mark``) in the send that
    carries its Started event: by the time a subscriber hears the event,
    no redelivered copy of the job may run."""
    from broker.control import started_mark
    from broker.keys import Keys

    keys = Keys("llmq-test")
    pub = Publisher(r)
    told: list[set[str]] = []
    pub.on_unheard(told.append)
    sub = r.pubsub()
    sub.subscribe("api-s")
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    pub.send([("api-s", Started(job_id="s", seq=0, worker="w", prompt_tokens=2, queue_s=0.0))],
             first=[started_mark(keys, "s", 60)])
    msg = sub.get_message(timeout=1)
    assert msg is not None and parse_event(msg["data"]).job_id == "s"
    assert r.get(keys.started("s")) == b"1" and 0 < r.ttl(keys.started("s")) <= 60
    pub.send([("nobody", Started(job_id="t", seq=0, worker="w", prompt_tokens=2, queue_s=0.0))],
             first=[started_mark(keys, "t", 60)])
    # A waiting publish reads the replies still unread first (the SET's counts for no job).
    assert pub.publish([("nobody", Delta(job_id="u", seq=1, text=".", completion_tokens=1))]) == [0]
    pub.send([])
    assert told == [{"t"}]
    pub.close()


def test_a_steps_events_for_one_channel_are_one_message(r: redis.Redis) -> None:
    """One PUBLISH per channel per call: the API reads one message for a
    whole step, and each event's subscriber count is that message's."""
    pub = Publisher(r)
    sub = r.pubsub()
    sub.subscribe("api-1")
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    step = [("api-1", Delta(job_id=f"j{i}", seq=1, text=str(i), completion_tokens=1)) for i in range(3)]
    assert pub.publish([*step, ("api-2", Delta(job_id="k", seq=1, text="-", completion_tokens=1))]) == [1, 1, 1, 0]
    msg = sub.get_message(timeout=1)
    assert [(e.job_id, e.text) for e in parse_message(msg["data"])] == [("j0", "0"), ("j1", "1"), ("j2", "2")]
    assert sub.get_message(timeout=0.2) is None  # nothing more: the step was one message
    pub.close()
