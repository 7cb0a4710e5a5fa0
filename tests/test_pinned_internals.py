"""What llmq relies on in Celery and kombu beyond their public APIs, checked
against a real redis-server and a real (in-process) Celery worker. These
fail when a new Celery or kombu changes it; ``pyproject.toml`` bounds both to
the versions that pass here.

- ``worker/redelivery.py``: kombu keeps a taken message in its unacked index,
  a re-scored one is never put back, one nobody re-scores is put back after
  the visibility timeout.
- ``broker/transport.py``: kombu's Redis channel builds every client it
  sends a command with in ``Channel._create_client``; it writes a message
  with ``_put``, reads one with ``_brpop_read`` (a consumer) or ``_get``
  (``basic_get``) and purges with ``_purge``, as llmq's fair share replaces
  them (``_brpop_read`` and ``_get`` are kombu's own with a ticket turned
  into its message: their source is pinned).
- ``worker/tasks.py``: Celery sends ``task_received`` for each message taken,
  calls the request's ``acknowledge``/``reject`` on the task's thread once it
  has freed the thread, and a task that raises ``Reject(requeue=True)`` has
  its message delivered again."""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from typing import Any

import redis
from celery import bootsteps
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Reject
from celery.worker import state
from celery.worker.request import Request
from kombu import Queue
from kombu.transport import redis as kombu_redis

from broker.celery_app import GENERATE_TASK, make_celery
from broker.schemas import Job
from broker.settings import Settings
from worker import tasks
from worker.hubwake import HubWaker
from worker.redelivery import Redelivery

VISIBILITY_S = 1.0


def settings_for(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, heartbeat_interval_s=0.2, heartbeat_ttl_s=VISIBILITY_S)


def test_kombu_still_has_what_redelivery_uses() -> None:
    assert list(inspect.signature(kombu_redis.QoS.restore_visible).parameters) == ["self", "start", "num", "interval"]
    assert isinstance(kombu_redis.Channel.unacked_index_key, str)
    for option in ("visibility_timeout", "unacked_mutex_expire", "unacked_index_key"):
        assert option in kombu_redis.Channel.from_transport_options  # set by broker/celery_app.py, read by tick


def test_a_held_message_is_kept_and_one_let_go_is_put_back(redis_url: str) -> None:
    """Redelivery.tick against kombu's real Redis transport: a held message
    stays taken past the visibility timeout; an acknowledged one is never
    re-added; one let go is back on its queue one timeout later."""
    app = make_celery(settings_for(redis_url))
    r = redis.Redis.from_url(redis_url)
    queue = Queue("llmq.test-held")
    redelivery = Redelivery(app)
    with app.connection_for_write() as conn:
        channel = conn.channel()
        index = channel.unacked_index_key
        conn.Producer(channel).publish({"n": 1}, routing_key=queue.name, declare=[queue])
        conn.Producer(channel).publish({"n": 2}, routing_key=queue.name, declare=[queue])
        held, acked = queue(channel).get(no_ack=False), queue(channel).get(no_ack=False)
        assert held is not None and acked is not None and r.llen(queue.name) == 0
        for message in (held, acked):
            assert r.zscore(index, message.delivery_tag) is not None  # taken: kombu indexes it
            redelivery.hold(message.delivery_tag)
        acked.ack()
        time.sleep(VISIBILITY_S + 0.3)
        redelivery.tick()
        score = r.zscore(index, held.delivery_tag)
        assert score is not None and score > time.time() - VISIBILITY_S  # re-scored, so not put back
        assert r.zscore(index, acked.delivery_tag) is None  # acknowledged: never re-added
        assert r.llen(queue.name) == 0
        redelivery.release(held.delivery_tag)
        redelivery.release(acked.delivery_tag)
        time.sleep(VISIBILITY_S + 0.3)
        redelivery.tick()
        assert r.zscore(index, held.delivery_tag) is None
        again = queue(channel).get(no_ack=True)
        assert again is not None and again.payload == {"n": 1}
        channel.close()
    redelivery.close()


class SpyRedelivery(Redelivery):
    def __init__(self, app: Any, log: list[tuple[str, Any]]) -> None:
        super().__init__(app)
        self.log = log

    def hold(self, delivery_tag: Any) -> None:
        self.log.append(("hold", threading.get_ident()))
        super().hold(delivery_tag)

    def release(self, delivery_tag: Any) -> None:
        self.log.append(("release", threading.get_ident()))
        super().release(delivery_tag)


class SpyGate:
    def __init__(self) -> None:
        self.log: list[tuple[str, bool]] = []
        self.applied_on: set[int] = set()

    def held(self, batch: bool) -> None:
        self.log.append(("held", batch))

    def released(self, batch: bool) -> None:
        self.log.append(("released", batch))

    def apply(self) -> None:
        self.applied_on.add(threading.get_ident())


class SpyWaker(HubWaker):
    def __init__(self, hub: Any, log: list[tuple[str, Any]]) -> None:
        super().__init__(hub, lambda: None)
        self.log = log

    def wake(self) -> None:
        # What makes the wake useful: Celery counts the thread free (task_ready) already.
        self.log.append(("wake", (threading.get_ident(), len(state.reserved_requests), time.monotonic())))
        super().wake()


def job(job_id: str) -> dict[str, Any]:
    return Job(job_id=job_id, model="m", kind="completion", prompt="x", reply_channel="",
               submitted_at=time.time()).model_dump(mode="json")


def test_celery_lets_go_of_each_message_once_its_thread_is_free(redis_url: str) -> None:
    """worker/tasks.py in a real Celery worker (threads pool, one thread, the
    broker settings of broker/celery_app.py): each job is held from the
    consumer thread before it runs and let go from its own thread after
    Celery freed that thread, then the consumer loop is woken, and takes the
    next job at once; a job that raises Reject(requeue=True) runs again."""
    app = make_celery(settings_for(redis_url), main="llmq-internals")
    tasks.register(app)
    log: list[tuple[str, Any]] = []
    app.llmq_redelivery = SpyRedelivery(app, log)  # type: ignore[attr-defined]
    gate = SpyGate()

    class Runtime:
        def __init__(self) -> None:
            self.gate = gate
            self.rejected = False

        def run(self, j: Job) -> dict[str, object]:
            log.append(("run", (j.job_id, threading.get_ident(), time.monotonic())))
            time.sleep(0.2)
            if j.job_id == "c" and not self.rejected:
                self.rejected = True
                raise Reject("not stored", requeue=True)
            return {"job_id": j.job_id, "status": "ok"}

    app.llmq_runtime = Runtime()  # type: ignore[attr-defined]

    class Waker(bootsteps.StartStopStep):
        requires = {"celery.worker.components:Hub"}

        def start(self, worker: Any) -> None:
            tasks.wake_after_each_job(worker.app, SpyWaker(worker.hub, log))

    app.steps["worker"].add(Waker)

    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=30):
        for job_id in "abc":
            app.send_task(GENERATE_TASK, kwargs={"job": job(job_id)}, task_id=job_id, ignore_result=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(1 for kind, _ in log if kind == "wake") < 4:
            time.sleep(0.05)
        time.sleep(0.3)  # the last acknowledgement, on the consumer thread
        kinds = [kind for kind, _ in log]
        # Fewer: a job let go did not wake the consumer loop, which then sleeps on.
        assert kinds == ["hold", "run", "release", "wake"] * 4, kinds
        r = redis.Redis.from_url(redis_url)
        assert r.zcard("unacked_index") == 0 and r.hlen("unacked") == 0  # acknowledged, or put back and run

    runs = [what for kind, what in log if kind == "run"]
    assert [job_id for job_id, _, _ in runs] == ["a", "b", "c", "c"]  # c: rejected, requeued, run again
    holds = {what for kind, what in log if kind == "hold"}
    consumer_thread = holds.pop()
    assert not holds, "every hold is on Celery's consumer thread"
    assert gate.applied_on == {consumer_thread}
    for i, run in enumerate(runs):
        _, thread, _ = run
        release, wake = log[4 * i + 2], log[4 * i + 3]
        assert release[1] == thread != consumer_thread  # let go on the task's own thread
        assert wake[1][0] == thread and wake[1][1] == 0  # ... after Celery freed it
    assert gate.log == [("held", False), ("released", False)] * 4
    # Woken, the consumer takes the next job at once, not on its next timer (up to a second).
    gaps = [runs[i + 1][2] - log[4 * i + 3][1][2] for i in range(3)]
    print("wake to next run:", [f"{g * 1000:.1f} ms" for g in gaps])
    assert max(gaps) < 0.5


def test_celery_still_calls_what_tasks_overrides() -> None:
    assert list(inspect.signature(Request.reject).parameters) == ["self", "requeue"]
    assert list(inspect.signature(Request.acknowledge).parameters) == ["self"]
    assert tasks.HeldRequest.__mro__[1] is Request


def test_a_channel_sends_every_command_with_one_client_per_pool(redis_url: str) -> None:
    """``broker/transport.py``: kombu still makes its clients in
    ``_create_client(asynchronous)``; with llmq's transport a publish, the
    unacked index and an ack share one client, and a replaced pool gets a
    new one."""
    assert list(inspect.signature(kombu_redis.Channel._create_client).parameters) == ["self", "asynchronous"]
    app = make_celery(settings_for(redis_url))
    made: list[Any] = []
    with app.connection_for_write() as conn:
        channel = conn.channel()
        real = channel.Client
        channel.Client = lambda **kw: made.append(real(**kw)) or made[-1]
        queue = Queue("llmq.test-one-client")
        with conn.Producer(channel) as producer:
            for i in range(3):
                producer.publish({"n": i}, routing_key=queue.name, declare=[queue])
        for _ in range(3):
            message = channel.basic_get(queue.name, no_ack=False)
            assert message is not None
            message.ack()
        assert len(made) == 1
        channel._disconnect_pools()
        with channel.conn_or_acquire() as client:
            assert client is not made[0] and len(made) == 2
        channel.close()


def test_the_channel_methods_fair_share_replaces_are_kombus_as_tested() -> None:
    """``broker/transport.py`` replaces these. If kombu changes them, read
    its new ``_brpop_read`` and ``_get`` against llmq's copies, then update
    the figures here (tests/test_fairness.py runs the replacements)."""
    pinned = {
        "_put": (["self", "queue", "message", "kwargs"], None),
        "_purge": (["self", "queue"], None),
        "_brpop_read": (["self", "options"], "9a9f7f5a6ad96f48"),
        "_get": (["self", "queue"], "c4e7625e2948a012"),
    }
    for name, (params, source_hash) in pinned.items():
        method = getattr(kombu_redis.Channel, name)
        assert list(inspect.signature(method).parameters) == params, name
        if source_hash is not None:
            assert hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16] == source_hash, name


def test_a_connection_that_fails_over_to_the_next_url_keeps_llmqs_transport() -> None:
    """Celery's reconnect switches a Sentinel broker to its next URL, and
    kombu takes that URL's scheme for the transport; broker/transport.py
    makes the schemes name llmq's transports, or the worker would come back
    on kombu's own channel, which cannot read a fair-share ticket."""
    from kombu import Connection

    from broker import transport

    conn = Connection("sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2/0", transport=transport.transport_name(True))
    assert conn.get_transport_cls() is transport.SentinelTransport
    conn.switch(conn.alt[1])  # what kombu's failover does
    assert conn.get_transport_cls() is transport.SentinelTransport
    assert Connection("redis://127.0.0.1:1/0").get_transport_cls() is transport.Transport

