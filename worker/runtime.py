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
from typing import Any

import redis
from celery.exceptions import Reject

from broker import __version__, batches, fairness
from broker.connections import sync_redis
from broker.control import MAX_QUEUE_TIME_EXCEEDED, Claim, claim, is_cancelled, linger, release, started_mark
from broker.keys import Keys, batch_queue_name, queue_name
from broker.schemas import Delta, Embeddings, Error, Heartbeat, Job, LineResult, ModelInfo, Started, TokenCount
from broker.settings import Settings
from worker.batchgate import BatchGate
from worker.embeddings import EmbeddingModel, InputTooLong
from worker.engines.protocol import Engine, Refused
from worker.engines.registry import EngineOptions
from worker.heartbeat import Heart
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
        self.heart = Heart(self.redis, self.keys, self.heartbeat, settings.heartbeat_interval_s,
                           settings.heartbeat_ttl_ms(), tick=redelivery.tick if redelivery else None)
        self._cancel_thread = threading.Thread(target=self._listen_cancels, name="llmq-cancels", daemon=True)
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch_engines, name="llmq-watchdog", daemon=True)
        self.gate = BatchGate(self.batch_queues(), options.max_batch_size, batch_reserve)
        publisher.on_unheard(self.cancel_unheard)

    def queues(self) -> list[str]:
        return [queue_name(name) for name in [*self.engines, *self.embedders]]

    def batch_queues(self) -> list[str]:
        return [batch_queue_name(name) for name in [*self.engines, *self.embedders]]

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
        self._stopping.set()
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
        while not self._stopping.wait(ENGINE_CHECK_S):
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
                return self._run_line(job)
            return self._run(job)
        except Reject:
            raise  # a batch line given back to the queue (_run_line): Celery puts its message back
        except Exception as exc:
            return self._crashed(job, exc)
        finally:
            self.publisher.unstream(job.job_id)

    def _run_line(self, job: Job) -> dict[str, object]:
        """A batch line: run like any job, but its events are kept and
        stored once as the line's result. A line whose batch is no longer in
        progress (cancelled, expired) is stored as skipped, not run. A line
        that cannot reach Redis (down at that moment) goes back to the
        queue: acknowledged, it would be lost, and its batch would wait for
        it to the end of its window."""
        assert job.batch is not None
        line, jid = job.batch, job.job_id
        try:
            status = batches.batch_status(self.redis, self.keys, line.batch_id)
            expired = time.time() > line.expires_at
            if status != batches.IN_PROGRESS or expired:
                if status is None:  # the batch is gone (deleted, or past its keep time)
                    return {"job_id": jid, "status": "batch_gone"}
                skipped = "batch_expired" if expired or status == batches.EXPIRED else "batch_cancelled"
                batches.record(self.redis, self.keys, line.batch_id, LineResult(
                    index=line.index, custom_id=line.custom_id, job_id=jid, skipped=skipped,
                    finished_at=time.time()))
                log.info("job %s: line %d of batch %s not run (%s)", jid, line.index, line.batch_id, skipped)
                return {"job_id": jid, "status": skipped}
            self.publisher.keep(jid)
            try:
                try:
                    result = self._run(job)
                except Exception as exc:  # here, so that its error event is kept with the line's
                    result = self._crashed(job, exc)
            finally:
                events = self.publisher.take(jid)
            if result.get("status") == "duplicate":
                if batches.has_result(self.redis, self.keys, line.batch_id, line.index):
                    return result  # another copy of the line ran it
                # Its claimer still looks alive: a live worker runs it, or a
                # dead one whose registry entry outlived the visibility of its
                # message (it died between its beat and re-scoring what it
                # held). Acknowledged, this copy would be the line's last, and
                # its batch would wait for it to the end of its window: it
                # goes back to the queue, and comes again until the line has
                # a result or its claimer has left the registry.
                log.warning("job %s: line %d of batch %s is claimed by a worker that looks alive and has no result "
                            "yet; back to the queue in %.1f s", jid, line.index, line.batch_id,
                            self.settings.heartbeat_interval_s)
                self._stopping.wait(self.settings.heartbeat_interval_s)
                raise Reject(f"line {line.index} of batch {line.batch_id}: claimed elsewhere, no result yet",
                             requeue=True)
            stored = batches.record(self.redis, self.keys, line.batch_id, LineResult(
                index=line.index, custom_id=line.custom_id, job_id=jid, events=events, finished_at=time.time()))
        except redis.RedisError as exc:
            log.error("job %s: line %d of batch %s could not reach Redis (%s: %s); it goes back to the queue and "
                      "runs again once Redis answers (its batch waits for it)", jid, line.index, line.batch_id,
                      type(exc).__name__, exc)
            # The copy put back must not find this run's claim, or it would be
            # skipped as a duplicate: so wait for Redis, however long it is
            # away. A worker that stops leaves the registry, which frees the
            # claim for a copy as well (broker/control.py).
            delay = 0.1
            while True:
                try:
                    release(self.redis, self.keys, jid, self.worker_id)
                    break
                except redis.RedisError:
                    if self._stopping.wait(delay):
                        break
                    delay = min(2 * delay, self.settings.heartbeat_interval_s)
            raise Reject(f"line {line.index} of batch {line.batch_id}: no result stored", requeue=True) from exc
        if not stored:
            log.warning("job %s: line %d of batch %s already had a result; this run's is dropped", jid, line.index,
                        line.batch_id)
        return result

    def _run(self, job: Job) -> dict[str, object]:
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

    def _crashed(self, job: Job, exc: Exception) -> dict[str, object]:
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
        while not self._stopping.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.cancel_channel())
                while not self._stopping.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    job_id = msg["data"].decode()
                    for engine in self._engines:
                        engine.cancel(job_id)
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(1.0)


def adapters_of(engine: Engine) -> list[str]:
    """The LoRA adapters an engine serves as model names (only the transformers engine has any)."""
    return list(getattr(engine, "adapters", {}))


def adapter_figures(engine: Engine, name: str) -> dict[str, Any]:
    """What a heartbeat says of a served name that is a LoRA adapter: its base, whether it is resident, its loads."""
    if name in engine.names:
        return {}
    bank = getattr(engine, "loras", None)
    return {"parent": engine.names[0], "resident": bank is not None and name in bank.resident(),
            "loads": bank.loads_of.get(name, 0) if bank is not None else 0}

