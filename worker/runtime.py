"""Everything a worker process runs besides Celery itself: the loaded models
and their engines, the heartbeat, the cancel listener, and ``run(job)``, the
body of the Celery task. Nothing here depends on which engine runs a job
(``worker/engines/``)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence

import redis
from celery.exceptions import Reject

from broker import __version__, fairness
from broker.connections import sync_redis
from broker.control import MAX_QUEUE_TIME_EXCEEDED, Claim, claim, is_cancelled, linger, started_mark
from broker.keys import Keys, batch_queue_name, queue_name
from broker.schemas import (AdapterChecked, Delta, Embeddings, Error, Heartbeat, Job, ModelInfo, Started,
                            TokenCount)
from broker.settings import Settings
from worker.adapters import AdapterSync, adapter_figures, adapters_of, hosts, resident_adapters
from worker.batchgate import BatchGate
from worker.embeddings import EmbeddingModel, InputTooLong
from worker.engines.protocol import Engine, Refused
from worker.engines.registry import EngineOptions
from worker.heartbeat import Heart
from worker.intake import Intake
from worker.lines import run_line
from worker.lora import AdapterError
from worker.prompts import PromptError, prompt_ids
from worker.publish import Publisher
from worker.redelivery import Redelivery

log = logging.getLogger("llmq.worker")

ENGINE_CHECK_S = 0.5


class Runtime:
    def __init__(self, settings: Settings, engines: Sequence[Engine], embedders: Sequence[EmbeddingModel],
                 publisher: Publisher, options: EngineOptions, worker_id: str,
                 redelivery: Redelivery | None = None, batch_reserve: int = 2) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.keys = Keys(settings.key_prefix)
        self.redis = sync_redis(settings)
        self.publisher = publisher
        self.options = options
        self._engines = list(engines)  # one per loaded model
        # Aliases share one engine, and so do the LoRA adapters an engine serves (each a model name of its own).
        self.engines: dict[str, Engine] = {name: e for e in engines for name in (*e.names, *adapters_of(e))}
        self.embedders: dict[str, EmbeddingModel] = {name: m for m in embedders for name in m.names}
        self.started_at = time.time()
        self.redelivery = redelivery
        self.gate = BatchGate(self.batch_queues(), options.max_batch_size, batch_reserve)
        # Adapters of --lora-dir and those loaded through the API, served from
        # the start (their queues are selected with the others) and followed
        # at each heartbeat.
        self.adapters = AdapterSync(self.redis, self.keys, hosts(self._engines), getattr(options, "lora_dir", None),
                                    self._adapter_changed)
        self._sync_adapters()
        self.intake = Intake(self.redis, self.queues, grace_s=2 * settings.heartbeat_interval_s
                             + settings.registry_cache_s + 1.0)
        self.heart = Heart(self.redis, self.keys, self._beat, settings.heartbeat_interval_s,
                           settings.heartbeat_ttl_ms(), tick=redelivery.tick if redelivery else None)
        self._cancel_thread = threading.Thread(target=self._listen_cancels, name="llmq-cancels", daemon=True)
        self.stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_engines, name="llmq-watchdog", daemon=True)
        publisher.on_unheard(self.cancel_unheard)

    def queues(self) -> list[str]:
        """The queues this worker takes jobs from now: each model's, but a
        LoRA adapter's only while one of its slots holds the adapter (with
        ``lora_affinity``): the API sends an adapter's job there when such a
        worker has room, and to the base's queue otherwise, whose taker loads
        the adapter and so starts taking from its queue."""
        names = [*self.engines, *self.embedders]
        if self.settings.lora_affinity:
            held = {n for e in self._engines for n in resident_adapters(e)}
            adapters = {n for e in self._engines for n in adapters_of(e)}
            names = [n for n in names if n not in adapters or n in held]
        return [queue_name(name) for name in names]

    def batch_queues(self) -> list[str]:
        return [batch_queue_name(name) for name in [*self.engines, *self.embedders]]

    # ------------------------------------------------ adapters come and go

    def _beat(self) -> Heartbeat:
        self._sync_adapters()
        return self.heartbeat()

    def _sync_adapters(self) -> None:
        try:
            self.adapters.sync()
        except Exception:  # never the heartbeat's end: the adapters served stay as they were
            log.exception("worker %s: could not update its LoRA adapters", self.worker_id)

    def _adapter_changed(self, name: str, engine: Engine | None) -> None:
        """Heart thread. Celery's consumer takes the change up on its next
        tick (``worker/intake.py``); the batch gate's queues follow."""
        if engine is None:
            self.engines.pop(name, None)
        else:
            self.engines[name] = engine
        self.gate.queues = self.batch_queues()

    def start(self) -> None:
        for engine in self._engines:
            engine.start()
        self._cancel_thread.start()
        self.heart.start()
        self._watchdog.start()
        log.info("worker %s serving %s", self.worker_id, ", ".join([*self.engines, *self.embedders]))

    def stop(self) -> None:
        """Warm shutdown: Celery has stopped consuming; leave the registry,
        let running jobs finish (up to ``drain_timeout_s``), then end the rest
        with an error event so no client waits for a worker that is gone."""
        self.heart.stop()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while any(e.emitter.running for e in self._engines) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stopping.set()
        for engine in self._engines:
            engine.stop()
        if self.redelivery is not None:  # its heartbeat tick has stopped with the heart
            self.redelivery.close()
        self.publisher.close()  # after the engines: their stop publishes the last errors

    def heartbeat(self) -> Heartbeat:
        engines = self._engines
        return Heartbeat(
            worker_id=self.worker_id,
            engine=self.options.engine,
            models=[
                ModelInfo(name=name, queue=queue_name(name), context_length=e.context_length, kind="chat",
                          running=e.emitter.running_for(name), jobs_per_s=round(e.emitter.jobs_per_s(), 3),
                          **adapter_figures(e, name))
                for name, e in self.engines.items()
            ] + [
                ModelInfo(name=name, queue=queue_name(name), context_length=m.context_length, kind="embedding")
                for name, m in self.embedders.items()
            ],
            device=",".join(sorted({e.device for e in engines} | {m.device for m in self.embedders.values()})),
            capacity=self.options.max_batch_size,
            running=sum(e.emitter.running for e in engines),
            tokens_per_s=round(sum(e.emitter.tokens_per_s() for e in engines), 2),
            step_s=round(max((e.step_s() for e in engines), default=0.0), 4),
            version=__version__,
            started_at=self.started_at,
            beat_at=time.time(),
        )

    def _watch_engines(self) -> None:
        """An engine that stops on its own (llama.cpp's server exits, vLLM's
        engine core dies) ends the worker as a crash would: it leaves the
        registry, its jobs end with an error event, and it shuts down, so a
        supervisor (compose's restart policy, systemd) can start it again."""
        while not self.stopping.wait(ENGINE_CHECK_S):
            dead = [e for e in self._engines if not e.healthy()]
            if not dead:
                continue
            log.error("worker %s: the %s engine of %s died; leaving the registry and shutting down",
                      self.worker_id, dead[0].kind, ",".join(dead[0].names))
            self.heart.stop()
            for engine in dead:
                engine.emitter.fail_all(503, "engine_died", "The engine running this job died; retry the request.")
            # Celery's warm shutdown: no new jobs; jobs still queued stay for other workers.
            os.kill(os.getpid(), signal.SIGTERM)
            return

    # ---------------------------------------------------------- the task

    def run(self, job: Job) -> dict[str, object]:
        """Run one job to its end; the return value is what Flower shows.
        Whatever goes wrong, the API hears of it: no client waits for a
        job that failed silently."""
        if job.events_stream is not None:
            self.publisher.stream(job.job_id, job.events_stream)
        try:
            if job.batch is not None:
                return run_line(self, job)
            return self.run_job(job)
        except Reject:
            raise  # a batch line given back to the queue (worker/lines.py): Celery puts its message back
        except Exception as exc:
            return self.crashed(job, exc)
        finally:
            self.publisher.unstream(job.job_id)

    def run_job(self, job: Job) -> dict[str, object]:
        jid = job.job_id
        if is_cancelled(self.redis, self.keys, jid):
            log.info("job %s: cancelled while queued, skipped", jid)
            return {"job_id": jid, "status": "cancelled_in_queue"}
        # A batch line's window is checked by _run_line, which stores it as skipped.
        deadline = job.queue_deadline() if job.batch is None else None
        got = claim(self.redis, self.keys, job.model, jid, self.worker_id, self.settings.claim_ttl_s, deadline)
        if got is Claim.EXPIRED:
            # Celery drops a message already expired when it arrives (Flower:
            # revoked); this one expired between its arrival and its claim, or
            # the API gave up on it at its deadline.
            return self._fail(job, 429, MAX_QUEUE_TIME_EXCEEDED, None,
                              f"The job waited {time.time() - job.submitted_at:.1f} s in the queue, past its max "
                              f"queue time of {job.max_queue_s or 0:.1f} s; nothing ran.")
        if got is Claim.HELD:
            log.warning("job %s: delivered again but claimed by a live worker or already started, skipped", jid)
            return {"job_id": jid, "status": "duplicate"}
        if got is Claim.TAKEN_OVER:
            log.warning("job %s: its worker died before starting it; running it here", jid)
        try:
            result = self._run_claimed(job)
            self._settle(job, result)
            return result
        finally:
            try:
                linger(self.redis, self.keys, jid, self.settings.job_key_linger_s)
            except redis.RedisError as exc:  # they keep their long TTL: no leak, only a slower cleanup
                log.warning("job %s: could not shorten its claim's TTL: %s", jid, exc)

    def _settle(self, job: Job, result: dict[str, object]) -> None:
        """Fair share: the job's tenant pays its real tokens, not the estimate it was charged when taken."""
        if job.share is None:
            return
        tokens = sum(int(str(result.get(k) or 0)) for k in ("prompt_tokens", "completion_tokens"))
        try:
            fairness.settle(self.redis, self.keys, job, tokens)
        except redis.RedisError as exc:  # the estimate stands; fairness is off by that much, nothing is lost
            log.warning("job %s: could not settle its tenant's tokens: %s", job.job_id, exc)

    def _run_claimed(self, job: Job) -> dict[str, object]:
        jid = job.job_id
        if job.kind == "embedding":
            return self._embed(job)
        engine = self.engines.get(job.model)
        if engine is None:
            return self._fail(job, 404, "model_not_found", "model", f"This worker does not serve '{job.model}'.")
        if job.kind == "adapter":
            return self._check_adapter(job, engine)
        try:
            engine.check(job)
            ids = prompt_ids(engine.tokenizer, job, engine.vocab_size, engine.tool_format)
        except Refused as exc:
            return self._fail(job, 400, exc.code, exc.param, str(exc))
        except PromptError as exc:
            return self._fail(job, 400, "invalid_prompt", exc.param, str(exc))
        if job.kind == "count":
            return self._counted(job, ids, engine)
        bad_bias = [t for t in job.sampling.logit_bias or {} if not 0 <= t < engine.vocab_size]
        if bad_bias:
            return self._fail(job, 400, "invalid_value", "logit_bias",
                              f"Token id {bad_bias[0]} in 'logit_bias' is outside this model's vocabulary "
                              f"(0..{engine.vocab_size - 1}).")
        if not ids:
            return self._fail(job, 400, "invalid_prompt", "prompt", "The prompt is empty.")
        context = engine.context_length
        room = context - len(ids)
        if room <= 0:
            return self._fail(
                job, 400, "context_length_exceeded", "messages" if job.kind == "chat" else "prompt",
                f"This model's maximum context length is {context} tokens, but the prompt has {len(ids)} tokens.",
            )
        wanted = job.sampling.max_tokens
        if wanted is not None and wanted > room:
            return self._fail(
                job, 400, "context_length_exceeded", "max_tokens",
                f"This model's maximum context length is {context} tokens; the prompt has {len(ids)} "
                f"and max_tokens asks for {wanted}, {len(ids) + wanted} in all.",
            )
        queue_s = max(0.0, time.time() - job.submitted_at)
        events: list[tuple[str, Started | Delta]] = [
            (job.reply_channel, Started(job_id=jid, seq=0, worker=self.worker_id, prompt_tokens=len(ids),
                                        queue_s=queue_s))
        ]
        if job.echo:
            echo = engine.tokenizer.decode(ids, skip_special_tokens=False)
            events += [(job.reply_channel, Delta(job_id=jid, seq=engine.emitter.next_seq(jid), index=i, text=echo,
                                                 completion_tokens=0)) for i in range(job.n)]
        # Sent (and so ordered) before the engine can emit any delta, on the
        # publisher's connection, in one write and without waiting for Redis:
        # two round trips less before the job reaches the engine. Marked
        # started first: from here a redelivered copy must never run again. A
        # batch line's tokens reach nobody before its end, so a copy redelivered
        # after this worker died may run it again (its result is stored once).
        # A job whose API process is gone is cancelled once the reply of its
        # Started is read back, a few sends later (as for a job whose API
        # process dies while it runs).
        mark = [started_mark(self.keys, jid, self.settings.claim_ttl_s)] if job.batch is None else []
        self.publisher.send(events, first=mark)
        choices = engine.submit(job, ids, wanted or room, queue_s)
        if is_cancelled(self.redis, self.keys, jid):  # a cancel that raced the submit
            engine.cancel(jid)
        for choice in choices:
            choice.ended.wait()
        completion = sum(c.tokens for c in choices)
        reasons = ",".join(sorted({c.finish_reason or "?" for c in choices}))
        log.info("job %s: %s, %d prompt + %d completion tokens in %d choice(s), queue %.3fs, total %.3fs", jid,
                 reasons, len(ids), completion, job.n, queue_s, time.monotonic() - choices[0].submitted)
        return {"job_id": jid, "status": reasons, "prompt_tokens": len(ids), "completion_tokens": completion}

    def _counted(self, job: Job, ids: list[int], engine: Engine) -> dict[str, object]:
        """FastChat's token check: the prompt's tokens, as a chat or
        completion job of this model would have them."""
        self.publisher.publish([(job.reply_channel, TokenCount(job_id=job.job_id, seq=0, prompt_tokens=len(ids),
                                                               context_length=engine.context_length))])
        return {"job_id": job.job_id, "status": "counted", "prompt_tokens": len(ids)}

    def _check_adapter(self, job: Job, engine: Engine) -> dict[str, object]:
        """Before the API lists an adapter loaded through it: read the
        adapter here and check it against this base, as a job of its own
        would, without taking a slot; a refusal is a 400 with the reason."""
        assert job.adapter is not None
        bank = getattr(engine, "loras", None)
        if not hasattr(bank, "serve"):
            return self._fail(job, 400, "invalid_adapter", "lora_path",
                              f"The {engine.kind} engine serving '{job.model}' takes LoRA adapters only at its start "
                              "(--lora), not loaded while it runs.")
        try:
            adapter = bank.read(job.adapter.name, job.adapter.path)
            bank.check(adapter)
        except AdapterError as exc:
            return self._fail(job, 400, "invalid_adapter", "lora_path", str(exc))
        self.publisher.publish([(job.reply_channel, AdapterChecked(job_id=job.job_id, seq=0, rank=adapter.rank,
                                                                   modules=len(adapter.weights)))])
        return {"job_id": job.job_id, "status": "adapter_checked", "adapter": adapter.name}

    def _embed(self, job: Job) -> dict[str, object]:
        embedder = self.embedders.get(job.model)
        if embedder is None:
            return self._fail(job, 400, "wrong_model_kind", "model", f"'{job.model}' is not an embedding model here.")
        try:
            vectors, tokens = embedder.encode(job.inputs or [])
        except InputTooLong as exc:
            return self._fail(job, 400, "context_length_exceeded", "input", str(exc))
        self.publisher.publish([(job.reply_channel, Embeddings(job_id=job.job_id, seq=0, vectors=vectors,
                                                               prompt_tokens=tokens))])
        log.info("job %s: embedded %d inputs, %d tokens", job.job_id, len(vectors), tokens)
        return {"job_id": job.job_id, "status": "embedded", "prompt_tokens": tokens}

    def crashed(self, job: Job, exc: Exception) -> dict[str, object]:
        log.exception("job %s: failed", job.job_id)
        return self._fail(job, 500, "worker_error", None, f"The worker failed this job: {type(exc).__name__}")

    def _fail(self, job: Job, status: int, code: str, param: str | None, message: str) -> dict[str, object]:
        log.info("job %s: refused (%s): %s", job.job_id, code, message)
        error_type = "invalid_request_error" if status < 500 else "server_error"
        ev = Error(job_id=job.job_id, seq=0, status=status, error_type=error_type, code=code, param=param,
                   message=message)
        self.publisher.publish([(job.reply_channel, ev)])
        return {"job_id": job.job_id, "status": code}

    # ------------------------------------------------------- cancellation

    def cancel_unheard(self, job_ids: set[str]) -> None:
        """No API process listened on the reply channel of these jobs' earlier
        events (read back late, see ``Publisher.send``), so nobody will read
        the rest: each is cancelled on whichever engine runs it. Called by
        the publisher in the thread that sent, whichever engine's."""
        for job_id in job_ids:
            for engine in self._engines:
                if engine.emitter.of_job(job_id):
                    log.warning("job %s: its reply channel has no subscriber, cancelling", job_id)
                    engine.cancel(job_id)

    def _listen_cancels(self) -> None:
        while not self.stopping.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.cancel_channel())
                while not self.stopping.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    job_id = msg["data"].decode()
                    for engine in self._engines:
                        engine.cancel(job_id)
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(1.0)
