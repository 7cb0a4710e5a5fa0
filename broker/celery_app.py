"""The Celery wiring both sides agree on. The API only sends tasks by name;
the worker registers the task under the same name (``worker/tasks.py``)."""

from __future__ import annotations

from celery import Celery

from broker.connections import celery_broker
from broker.transport import KEY_PREFIX_OPTION, transport_name
from broker.settings import Settings

GENERATE_TASK = "llmq.generate"


def make_celery(settings: Settings, main: str = "llmq") -> Celery:
    broker_url, transport = celery_broker(settings)
    app = Celery(main, broker=broker_url)
    app.conf.update(
        # Kombu's Redis transport, less a redis-py client built per command.
        broker_transport=transport_name(sentinel=bool(settings.redis_sentinels)),
        # Jobs are JSON: readable in Flower and safe to decode.
        task_serializer="json",
        accept_content=["json"],
        # Results travel over our own reply channel, never a result backend.
        task_ignore_result=True,
        # A worker holds only the jobs it is running, so an idle worker
        # elsewhere gets the rest: pull-based dispatch replaces FastChat's
        # shortest-queue guess.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        # After a broker reconnect Celery would cut the prefetch to the free
        # slots and give one back per *new* job acknowledged: a worker whose
        # slots were busy at a failover took one job at a time for a minute.
        # With prefetch disabled a job is fetched only into a free slot anyway.
        worker_enable_prefetch_count_reduction=False,
        # A job's message is acknowledged when it ends, so one its worker
        # dies with, or gives back (Reject(requeue=True): a batch line whose
        # result could not be stored, worker/runtime.py), runs again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Kombu puts an unacknowledged message back after this long. Workers
        # re-score the messages they hold on every heartbeat and put back
        # those nobody re-scored (worker/redelivery.py), so a job its worker
        # died with returns about when that worker leaves the registry, and a
        # redelivered copy can see it is gone (broker/control.py). A live
        # worker's beat late by a whole TTL only costs a spare delivery: the
        # claim key keeps the job running once.
        # Kombu's restore runs under a Redis lock that lives 5 minutes by
        # default: a worker killed while holding it stopped every restore for
        # that long. One beat is ample (a restore takes milliseconds, and its
        # transaction never puts a message back twice).
        broker_transport_options={
            "visibility_timeout": settings.heartbeat_ttl_s,
            "unacked_mutex_expire": settings.heartbeat_interval_s,
            # Where fair share keeps its lists (broker/transport.py, broker/fairness.py).
            KEY_PREFIX_OPTION: settings.key_prefix, **transport},
        broker_connection_retry_on_startup=True,
        # Flower shows each job as a task.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Nothing else should land on Celery's default queue.
        task_default_queue="llmq.default",
        worker_hijack_root_logger=False,
    )
    return app
