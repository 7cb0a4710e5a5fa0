"""Every Redis name llmq uses. This is the only module that spells them.

Celery's own keys (the model queues, unacked sets) stay as kombu names them so
Flower can read queue lengths; the queue *names* are built here too.
"""

from __future__ import annotations

QUEUE_PREFIX = "llmq."


def queue_name(model: str) -> str:
    """The Celery queue that carries jobs for one served model name."""
    return f"{QUEUE_PREFIX}{model}"


# Kombu's Redis transport keeps a queue's messages in one list per priority
# step: the queue's own name for step 0, the name plus this separator and the
# step for the others (kombu.transport.redis: Channel.sep, PRIORITY_STEPS;
# tests/test_kombu_layout.py checks it).
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold a Celery queue's waiting messages, one per priority step."""
    return [queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}" for step in KOMBU_PRIORITY_STEPS]


def batch_queue_name(model: str) -> str:
    """The Celery queue of a model's batch lines. A worker takes from it only
    while it has room for batch work (``worker/batchgate.py``); its name
    cannot clash with ``queue_name`` of any model."""
    return f"llmq-batch.{model}"


class Keys:
    """Key and channel names under one prefix (default ``llmq:``)."""

    def __init__(self, prefix: str = "llmq:") -> None:
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Keys(prefix={self.prefix!r})"

    # registry
    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}worker:*"

    def models_seen(self) -> str:
        """Hash: model name -> JSON of its last announced info, never expires.

        Lets the API tell a model nobody ever served (404) from a model whose
        workers are all gone (503)."""
        return f"{self.prefix}models"

    def adapters(self) -> str:
        """Hash: LoRA adapter name -> JSON ``AdapterEntry`` (its base and
        path), never expires. Written by the API's admin routes (load,
        unload); every worker of the base reads it each heartbeat and serves
        what it lists (``worker/adapters.py``)."""
        return f"{self.prefix}adapters"

    def waiting(self, model: str) -> str:
        """Sorted set of the model's admitted, not yet started jobs (score:
        admission time); the API's queue bound counts it atomically."""
        return f"{self.prefix}waiting:{model}"

    # per-job state
    def reply_channel(self, api_instance: str) -> str:
        return f"{self.prefix}reply:{api_instance}"

    def cancel_channel(self) -> str:
        return f"{self.prefix}cancel"

    def cancelled(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:cancelled"

    def claim(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:claim"

    def file(self, file_id: str) -> str:
        """A hash: the file's metadata (JSON) and its content."""
        return f"{self.prefix}file:{file_id}"

    def files(self) -> str:
        """Every file's id, scored by its creation time (entries of expired files are pruned on listing)."""
        return f"{self.prefix}files"

    # batches (broker/batches.py)
    def batch(self, batch_id: str) -> str:
        """A hash: ``status``, ``object`` (the batch's JSON as the API shows
        it, less its counts), the counts ``total``, ``completed``,
        ``failed``, ``enqueued``; while open, ``input`` (a copy of the input
        file, so deleting the file cannot orphan the batch); ``finalize_as``
        (completed or expired, for a finalization redone after a crash);
        ``output_file`` / ``error_file`` (result file ids, chosen once)."""
        return f"{self.prefix}batch:{batch_id}"

    def batch_results(self, batch_id: str) -> str:
        """A hash: line index -> LineResult JSON, each written once."""
        return f"{self.prefix}batch:{batch_id}:results"

    def batch_lease(self, batch_id: str) -> str:
        """Which API process advances the batch now (validates, enqueues,
        finalizes); it expires, so another takes over if that one dies."""
        return f"{self.prefix}batch:{batch_id}:lease"

    def batches(self) -> str:
        """Every batch's id, scored by its creation time (for listing)."""
        return f"{self.prefix}batches"

    def batches_open(self) -> str:
        """A set: ids of batches not yet in a final state."""
        return f"{self.prefix}batches:open"

    # responses (/v1/responses, api/responses*.py)
    def response(self, response_id: str) -> str:
        """A hash: ``record`` (what was asked: the request, its input items,
        and what the API alone knows of the response), ``ended`` (set once, by
        the first API process to see the end), ``deleted`` (a short tombstone
        after DELETE). The answer itself is in its events stream."""
        return f"{self.prefix}response:{response_id}"

    def response_events(self, response_id: str) -> str:
        """A stream: every event of the response's job(s), appended by the
        worker (entry field ``event``), and the API's own marks (cancelled,
        failed for a lost worker). The response is rebuilt from it."""
        return f"{self.prefix}response:{response_id}:events"

    def responses_open(self) -> str:
        """A set: ids of responses not yet ended, watched by every API process."""
        return f"{self.prefix}responses:open"

    def started(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:started"

    # Fair share (broker/fairness.py), per kombu list (a model's queue at one
    # priority step): each tenant's own list of waiting messages, the tenants
    # waiting (sorted by counter), every tenant's counter, and the counter of
    # the last one served.
    def fair_tenant(self, list_name: str, tenant: str) -> str:
        return f"{self.prefix}fair:{list_name}:t:{tenant}"

    def fair_waiting(self, list_name: str) -> str:
        return f"{self.prefix}fair:{list_name}:waiting"

    def fair_counters(self, list_name: str) -> str:
        return f"{self.prefix}fair:{list_name}:counters"

    def fair_served(self, list_name: str) -> str:
        return f"{self.prefix}fair:{list_name}:served"

    def fair_pattern(self, list_name: str) -> str:
        return f"{self.prefix}fair:{list_name}:*"
