"""A job nobody listens to any more is cancelled on whichever engine runs
it, in a worker that runs several: the publisher, shared by the engines,
learns late (``Publisher.send`` reads replies in batches) that a job's
events reached no subscriber, possibly while another engine sends, and
hands the job to the runtime's one handler over every engine."""

from __future__ import annotations

import time

import redis

from broker.schemas import Job
from broker.settings import Settings
from worker.engines.emitter import Emitter
from worker.engines.protocol import Choice, Update, choices_of
from worker.engines.registry import EngineOptions
from worker.publish import UNREAD_MAX, Publisher
from worker.runtime import Runtime
from worker.toolcalls import FORMATS


class FakeEngine:
    """Only what the runtime and the emitter touch: names, an emitter, cancel."""

    def __init__(self, name: str, publisher: Publisher) -> None:
        self.names = (name,)
        self.emitter = Emitter(publisher, FORMATS["generic"])
        self.cancelled: list[str] = []

    def submit(self, job: Job) -> list[Choice]:
        choices = choices_of(job, [1, 2, 3], 16, 0.0)
        self.emitter.add(choices)
        return choices

    def cancel(self, job_id: str) -> bool:
        choices = self.emitter.of_job(job_id)
        for c in choices:
            self.emitter.end(c, "cancelled")
        self.cancelled.append(job_id)
        return bool(choices)


def job(job_id: str, channel: str) -> Job:
    return Job(job_id=job_id, model="m", kind="chat", reply_channel=channel, submitted_at=time.time())


def test_an_unheard_job_is_cancelled_on_its_own_engine_when_another_engine_learns_of_it(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    publisher = Publisher(r)
    heard, unheard = FakeEngine("a", publisher), FakeEngine("b", publisher)
    Runtime(Settings(redis_url=redis_url), [heard, unheard], [], publisher, EngineOptions(),  # type: ignore[list-item]
            worker_id="w")
    sub = r.pubsub()
    sub.subscribe("api-alive")
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    alive = heard.submit(job("alive", "api-alive"))
    orphan = unheard.submit(job("orphan", "api-gone"))  # its API process is gone: nobody subscribes
    unheard.emitter.publish([Update(orphan[0], text="x", tokens=1)])
    for _ in range(UNREAD_MAX + 1):  # engine a's steps; the replies are read back on one of them
        heard.emitter.publish([Update(alive[0], text=".", tokens=1)])
        if unheard.cancelled:
            break
    assert unheard.cancelled == ["orphan"] and orphan[0].finish_reason == "cancelled"
    assert heard.cancelled == [] and alive[0].finish_reason is None
    publisher.close()
