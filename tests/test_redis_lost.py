"""What the API and the worker do with their jobs while Redis is lost (a
failover, a restart), against a real redis-server stopped and started
again: no job is sent while the API's reply channel is unsubscribed, and the
worker cancels the jobs whose events went down with Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from api.jobs.replies import ReplyRouter
from broker.schemas import Delta, Started, parse_message
from tests.procs import start_redis
from worker.publish import UNREAD_MAX, Publisher


def test_the_worker_names_the_jobs_whose_events_went_down_with_redis(tmp_path: Path) -> None:
    """Their API processes lost Redis too and failed them: once Redis is back
    the next send hands them to the runtime's handler, which cancels them
    (``Publisher.on_unheard``).
    A streamed or kept job is not named: its events are not for a subscriber."""
    proc, port = start_redis(tmp_path)
    pub = Publisher(redis.Redis(port=port))
    unheard: list[set[str]] = []
    pub.on_unheard(unheard.append)

    def send(events: list[tuple[str, Any]]) -> set[str]:
        """The jobs the send named as unheard."""
        unheard.clear()
        pub.send(events)
        return set().union(*unheard)
    pub.stream("streamed", "llmq:test:stream")
    pub.keep("kept")

    def step(seq: int) -> list[tuple[str, Delta]]:
        return [(channel, Delta(job_id=job, seq=seq, text=".", completion_tokens=seq))
                for job, channel in (("a", "chan"), ("streamed", "chan"), ("kept", "chan"))]

    def listen() -> None:  # job a is heard, as long as Redis stays up
        sub = redis.Redis(port=port).pubsub()
        sub.subscribe("chan")
        assert sub.get_message(timeout=5)["type"] == "subscribe"
        listeners.append(sub)

    listeners: list[redis.client.PubSub] = []
    try:
        listen()
        for seq in range(1, 2 * UNREAD_MAX):  # replies read back: heard
            assert send(step(seq)) == set()
        proc.kill()
        with pytest.raises(redis.ConnectionError):  # a write or two may still go into the dead socket
            for seq in range(200, 210):
                pub.send(step(seq))
        proc, _ = start_redis(tmp_path, port)
        listen()
        assert send([]) == {"a"}
        assert send([]) == set()  # named once
        # Back before the next step (a failover between two slow steps): the
        # events written into the dead connection are lost all the same.
        assert send(step(300)) == set()
        proc.kill()
        proc, _ = start_redis(tmp_path, port)
        listen()
        gone: set[str] = set()
        for seq in range(301, 310):
            gone |= send(step(seq))
        assert gone == {"a"}
        # Back before anything was sent: a job's Started is not written into
        # the closed connection (lost, its request would wait for it).
        assert send(step(400)) == set()
        proc.kill()
        proc, _ = start_redis(tmp_path, port)
        listen()
        started = Started(job_id="new", seq=0, worker="w", prompt_tokens=3, queue_s=0.0)
        assert send([("chan", started)]) == {"a"}
        heard = [listeners[-1].get_message(timeout=5) for _ in range(1)]
        assert [parse_message(m["data"])[0].job_id for m in heard if m] == ["new"]
    finally:
        pub.close()
        proc.kill()


def test_the_api_sends_no_job_while_its_reply_channel_is_not_subscribed(tmp_path: Path) -> None:
    """Such a job's events would reach nobody and its request would wait for
    them until a timeout: ``open`` refuses it (a 503 ``broker_unavailable``)."""
    proc, port = start_redis(tmp_path)

    async def scenario() -> None:
        nonlocal proc
        router = ReplyRouter(aioredis.Redis(port=port), "llmq:test:reply")
        with pytest.raises(RedisConnectionError):
            router.open("before-start")
        await router.start()
        try:
            q = router.open("open-at-the-loss")
            proc.kill()
            assert (await asyncio.wait_for(q.get(), 10)).code == "broker_unavailable"  # type: ignore[union-attr]
            with pytest.raises(RedisConnectionError):
                router.open("while-lost")
            proc, _ = start_redis(tmp_path, port)
            for _ in range(200):  # subscribed again within a few RESUBSCRIBE_DELAY_S
                try:
                    router.open("after")
                    break
                except RedisConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the reply channel was not subscribed again")
        finally:
            await router.stop()

    try:
        asyncio.run(scenario())
    finally:
        proc.kill()

