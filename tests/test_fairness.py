"""Fair share between API keys (``broker/fairness.py``) through the real
stack under Celery: messages sent with Celery's ``send_task`` through llmq's
kombu transport into a real redis-server, taken back by kombu's own
``BRPOP`` consumer and by ``basic_get``."""

from __future__ import annotations

import redis
from celery import Celery
from kombu import Connection, Consumer, Queue

from broker import fairness
from broker.celery_app import GENERATE_TASK, make_celery
from broker.keys import Keys, priority_lists, queue_name
from broker.schemas import Job, Sampling, Share
from broker.settings import Settings


def send(app: Celery, queue: str, job_id: str, tenant: str | None, estimate: int, priority: int = 3) -> None:
    headers = None if tenant is None else {fairness.HEADER: fairness.header(Share(tenant=tenant, estimate=estimate))}
    app.send_task(GENERATE_TASK, kwargs={"job_id": job_id}, queue=queue, task_id=job_id, priority=priority,
                  headers=headers)


def taken_by_brpop(url: str, queue: str, n: int) -> list[str]:
    """Task ids in the order kombu's async consumer (what a Celery worker runs) delivers them."""
    order: list[str] = []
    with Connection(url, transport="broker.transport:Transport") as conn:
        def got(body: object, message: object) -> None:
            order.append(message.headers["id"])  # type: ignore[attr-defined]
            message.ack()  # type: ignore[attr-defined]

        with Consumer(conn, queues=[Queue(queue)], callbacks=[got], accept=["json"]):
            while len(order) < n:
                conn.drain_events(timeout=5)
    return order


def test_a_key_with_many_long_jobs_does_not_crowd_out_one_with_few_short_ones(redis_url: str) -> None:
    app = make_celery(Settings(redis_url=redis_url))
    queue = queue_name("fair-m")
    for i in range(10):
        send(app, queue, f"a{i}", "team-a", estimate=500)
    send(app, queue, "b0", "team-b", estimate=50)
    send(app, queue, "b1", "team-b", estimate=50)
    r = redis.Redis.from_url(redis_url)
    lists = priority_lists(queue)
    assert r.llen(lists[1]) == 12  # one ticket per message in kombu's list: Flower's length is right

    order = taken_by_brpop(redis_url, queue, 12)
    # Both start level (nothing served yet); after a's first job (500 tokens)
    # b is the lower until its two short ones are done. First come, first
    # served would give a0..a9, b0, b1.
    assert order == ["a0", "b0", "b1", *[f"a{i}" for i in range(1, 10)]], order
    counters = fairness.counters(r, Keys("llmq:"), lists[1])
    assert counters == {"team-a": 5000.0, "team-b": 100.0}, counters
    assert not r.keys("llmq:fair:*:t:*")  # every tenant list drained


def test_weights_divide_the_charge_and_the_worker_settles_real_tokens(redis_url: str) -> None:
    keys, r = Keys("llmq:"), redis.Redis.from_url(redis_url)
    app = make_celery(Settings(redis_url=redis_url))
    queue = queue_name("fair-w")
    list_name = priority_lists(queue)[1]
    heavy = Share(tenant="gold", weight=4, estimate=400)
    app.send_task(GENERATE_TASK, kwargs={}, queue=queue, task_id="g0", priority=3,
                  headers={fairness.HEADER: fairness.header(heavy)})
    assert taken_by_brpop(redis_url, queue, 1) == ["g0"]
    assert fairness.counters(r, keys, list_name) == {"gold": 100.0}  # 400 tokens at weight 4
    job = Job(job_id="g0", model="fair-w", kind="chat", messages=[{"role": "user", "content": "hi"}],
              sampling=Sampling(max_tokens=400), reply_channel="", submitted_at=0.0, priority=3, share=heavy)
    fairness.settle(r, keys, job, tokens=40)  # it took 40, not 400
    assert fairness.counters(r, keys, list_name) == {"gold": 10.0}


def test_an_idle_tenant_earns_no_credit_and_plain_messages_pass_through(redis_url: str) -> None:
    """A tenant that comes back is lifted to the least waiting counter, and a
    message without the header (a batch line, fair share off) is a message."""
    keys, r = Keys("llmq:"), redis.Redis.from_url(redis_url)
    app = make_celery(Settings(redis_url=redis_url))
    queue = queue_name("fair-idle")
    list_name = priority_lists(queue)[1]
    for i in range(3):
        send(app, queue, f"x{i}", "busy", estimate=1000)
    assert taken_by_brpop(redis_url, queue, 3) == ["x0", "x1", "x2"]
    send(app, queue, "x3", "busy", estimate=1000)
    send(app, queue, "q0", "quiet", estimate=10)  # waited 0 tokens so far, but arrives behind busy's 3000
    send(app, queue, "plain", None, estimate=0)
    assert fairness.counters(r, keys, list_name)["quiet"] == 2999.0  # lifted to just under busy's, not left at 0
    send(app, queue, "q1", "quiet", estimate=10)
    with Connection(redis_url, transport="broker.transport:Transport") as conn:
        got = [conn.SimpleQueue(queue, no_ack=True).get(timeout=1).headers["id"] for _ in range(4)]
    # basic_get: the same fair order (quiet first; then busy, whose 3000 is
    # under quiet's 3009), and the plain one where it came in kombu's list.
    assert got == ["q0", "x3", "plain", "q1"], got


def test_a_purged_queue_leaves_no_tenant_lists(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    app = make_celery(Settings(redis_url=redis_url))
    queue = queue_name("fair-purge")
    send(app, queue, "p0", "t", estimate=1)
    with Connection(redis_url, transport="broker.transport:Transport") as conn:
        assert conn.SimpleQueue(queue).clear() == 1
    assert not r.keys("llmq:fair:llmq.fair-purge*:t:*")
