"""Prometheus metrics of the API, named as vLLM names them (``llmq:`` for
``vllm:``) so existing dashboards carry over.

Request metrics are observed when each job ends (``observe_job``). Gauges of
running and waiting jobs per model, and each worker's own figures (batch
size, tokens/s, engine step time, from its heartbeat), are read from Redis
when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.keys import batch_queue_name, priority_lists, queue_name
from broker.registry import Registry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclass(frozen=True, kw_only=True)
class JobFigures:
    model: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    first_token_s: float | None
    total_s: float
    token_gaps_s: list[float]
    finish_reason: str | None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("llmq:time_to_first_token_seconds", "Time from request to first token.", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmq:inter_token_latency_seconds", "Time between output tokens.", ["model"],
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llmq:e2e_request_latency_seconds", "Time from request to last token.", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("llmq:request_queue_time_seconds", "Time a job waited in its queue.", ["model"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmq:prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("llmq:generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.success = Counter("llmq:request_success", "Finished requests by finish reason.",
                               ["model", "finished_reason"], registry=r)
        self.errors = Counter("llmq:request_errors", "Failed requests by HTTP status and error code.",
                              ["status", "code"], registry=r)
        self.running = Gauge("llmq:num_requests_running", "Jobs running on workers.", ["model"], registry=r)
        self.waiting = Gauge("llmq:num_requests_waiting", "Jobs waiting in the model's queue.", ["model"], registry=r)
        self.workers = Gauge("llmq:num_workers", "Live workers serving the model.", ["model"], registry=r)
        self.batch_waiting = Gauge("llmq:num_batch_lines_waiting", "Batch lines waiting in the model's batch queue.",
                                   ["model"], registry=r)
        # What an autoscaler needs (deploy/kubernetes/): a list length alone
        # misses the running jobs and every priority step but one.
        self.outstanding = Gauge("llmq:num_jobs_outstanding", "Jobs waiting (every priority step of the model's "
                                 "queue and its batch queue) plus jobs running: the autoscaling signal.", ["model"],
                                 registry=r)
        self.expired = Counter("llmq:queue_deadline_expired", "Jobs dropped unrun, still queued past their max "
                               "queue time (x-llmq-max-queue-time).", ["model"], registry=r)
        # By the key's name (api/keys.py), never the key itself.
        self.key_requests = Counter("llmq:api_key_requests", "Requests by API key name: admitted or rate_limited.",
                                    ["key_name", "outcome"], registry=r)
        self.key_tokens = Counter("llmq:api_key_tokens", "Prompt and completion tokens by API key name.",
                                  ["key_name"], registry=r)
        # Set by the batch keeper each tick (api/batches/keeper.py), summed over open batches: never per batch id.
        self.batches = Gauge("llmq:batches", "Open batches by status.", ["status"], registry=r)
        self.batch_lines = Gauge("llmq:batch_lines", "Lines of open batches: queued (not yet ended), completed, "
                                 "failed.", ["state"], registry=r)
        # Counted once per response, by the keeper that sees it end (api/responses/keeper.py).
        self.responses = Counter("llmq:responses", "Responses (/v1/responses) ended, by status.", ["status"],
                                 registry=r)
        self.worker_batch = Gauge("llmq:worker_batch_size", "Jobs in the worker's batch.", ["worker"], registry=r)
        self.worker_tps = Gauge("llmq:worker_generation_tokens_per_second", "Worker output tokens/s (10 s window).",
                                ["worker"], registry=r)
        self.worker_info = Gauge("llmq:worker_info", "1 per live worker, labelled with its engine.",
                                 ["worker", "engine"], registry=r)
        self.worker_step = Gauge("llmq:worker_engine_step_seconds", "Worker's recent mean engine step time.",
                                 ["worker"], registry=r)
        # LoRA adapters (served as model names: request and token metrics are per adapter already).
        self.lora_resident = Gauge("llmq:lora_resident", "1 per LoRA adapter whose weights a worker holds in a slot.",
                                   ["worker", "model", "parent"], registry=r)
        self.lora_loads = Gauge("llmq:lora_loads", "Times a worker loaded a LoRA adapter into a slot, since it "
                                "started.", ["worker", "model"], registry=r)

    def observe_batches(self, statuses: Mapping[str, int], lines: Mapping[str, int]) -> None:
        """Open batches per status and their lines per state, as each batch keeper tick reads them."""
        for status, count in statuses.items():
            self.batches.labels(status).set(count)
        for state, count in lines.items():
            self.batch_lines.labels(state).set(count)

    def observe_job(self, f: JobFigures) -> None:
        self.prompt_tokens.labels(f.model).inc(f.prompt_tokens)
        self.generation_tokens.labels(f.model).inc(f.completion_tokens)
        self.queue.labels(f.model).observe(f.queue_s)
        if f.first_token_s is not None:
            self.ttft.labels(f.model).observe(f.first_token_s)
        itl = self.itl.labels(f.model)
        for gap in f.token_gaps_s:
            itl.observe(gap)
        if f.finish_reason is not None:
            self.e2e.labels(f.model).observe(f.total_s)
            self.success.labels(f.model, f.finish_reason).inc()

    def observe_key(self, name: str, outcome: str) -> None:
        self.key_requests.labels(name, outcome).inc()

    def observe_error(self, status: int, code: str | None) -> None:
        self.errors.labels(str(status), code or "none").inc()

    async def render(self, registry: Registry, r: aioredis.Redis, declared: Iterable[str] = ()) -> bytes:
        """``declared``: models that may have no live worker (LLMQ_MODELS);
        their queues are shown too, which is how an autoscaler sees demand
        for a model scaled to zero."""
        live = await registry.live_models()
        for gauge in (self.running, self.waiting, self.workers, self.batch_waiting, self.outstanding,
                      self.worker_batch, self.worker_tps, self.worker_step, self.worker_info, self.lora_resident,
                      self.lora_loads):
            gauge.clear()  # gone models and workers must not linger
        for name in sorted({*live, *declared}):
            workers = live[name].workers if name in live else []
            interactive, batch = priority_lists(queue_name(name)), priority_lists(batch_queue_name(name))
            async with r.pipeline(transaction=False) as pipe:
                for key in (*interactive, *batch):
                    pipe.llen(key)
                lengths = await pipe.execute()
            waiting, batch_waiting = sum(lengths[:len(interactive)]), sum(lengths[len(interactive):])
            running = sum(m.running for w in workers for m in w.models if m.name == name)
            self.workers.labels(name).set(len(workers))
            self.waiting.labels(name).set(waiting)
            self.batch_waiting.labels(name).set(batch_waiting)
            self.running.labels(name).set(running)
            self.outstanding.labels(name).set(waiting + batch_waiting + running)
        for w in await registry.workers():
            self.worker_batch.labels(w.worker_id).set(w.running)
            self.worker_tps.labels(w.worker_id).set(w.tokens_per_s)
            self.worker_step.labels(w.worker_id).set(w.step_s)
            self.worker_info.labels(w.worker_id, w.engine).set(1)
            for m in w.models:
                if m.parent is not None:
                    self.lora_loads.labels(w.worker_id, m.name).set(m.loads)
                    if m.resident:
                        self.lora_resident.labels(w.worker_id, m.name, m.parent).set(1)
        return generate_latest(self.registry)
