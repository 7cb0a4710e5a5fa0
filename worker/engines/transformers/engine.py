"""The continuous-batching engine of one loaded model.

One engine thread runs the model step after step. Each step it

1. takes new runs and drops cancelled ones (so a cancel frees its batch row
   within one step);
2. schedules: every decoding sequence gets one token (streams never wait
   behind prompts), then prompt chunks of new sequences fill the step's
   token budget (``max_step_tokens``), oldest first; a long prompt is
   prefilled over several steps, interleaved with decoding;
3. runs the model's own forward once over all of the step's tokens as one
   flat sequence, with attention over the paged KV cache
   (``attention.py``, ``kvcache.py``; the step's layout: ``runs.py``);
4. picks the next token of every sequence whose prompt is done, in one
   batched call (``sampler.py``), and hands the step's tokens to the
   pump thread.

The pump thread detokenizes, applies stop strings, attaches logprobs and
publishes one event per choice, the whole step in one Redis pipeline.
Celery's worker threads only submit and wait.

A job may name a LoRA adapter served on this model (``--lora``,
``--lora-dir``, or loaded through the API: ``worker/adapters.py``): its
rows run in the same steps as every other row, with their adapter's deltas
(``lora.py``); a row whose adapter finds no free slot waits its turn.

A sequence takes KV blocks as it grows. When none is left, the most
recently admitted sequence is preempted: its blocks go back and it is
computed again later from its prompt and the tokens it already produced
(prefix caching usually makes that cheap). Its client sees nothing of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from broker.schemas import FinishReason, Job
from worker.engines.batchers import Pump
from worker.engines.emitter import Emitter
from worker.engines.protocol import Choice, Refused
from worker.engines.transformers import TransformersOptions
from worker.engines.transformers.attention import NAME as ATTENTION
from worker.engines.transformers.attention import STEP_KWARG
from worker.engines.transformers.detok import IncrementalDetokenizer
from worker.engines.transformers.grammars import Grammars
from worker.engines.transformers.kvcache import KVCache
from worker.engines.transformers.lora import LoraBank
from worker.engines.transformers.profile import StepProfile
from worker.engines.transformers.runs import Plan, Run, StepOutput, layout, updates_of
from worker.engines.transformers.sampler import Sampler, Slot
from worker.grammar import spec_of
from worker.loading import LoadedModel, ModelSpec, load
from worker.lora import Adapter, AdapterError
from worker.publish import Publisher
from worker.toolcalls import format_for

log = logging.getLogger("llmq.worker.engine")

BLOCK_SIZE = 16


def _cache_for(lm: LoadedModel, kv_cache_tokens: int, prefix_caching: bool) -> KVCache:
    cfg = lm.model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVCache(layers=cfg.num_hidden_layers, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, num_blocks=-(-kv_cache_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE,
                   # bitsandbytes quantizes the linear layers only: the embeddings keep the compute dtype
                   dtype=lm.model.get_input_embeddings().weight.dtype, device=lm.device,
                   prefix_caching=prefix_caching)


class Engine:
    """The transformers engine: llmq's own continuous batching over the
    model's transformers forward."""

    kind = "transformers"

    def __init__(self, spec: ModelSpec, options: TransformersOptions, publisher: Publisher) -> None:
        self.lm = lm = load(spec)
        self.names = lm.names
        self.context_length = lm.context_length
        self.vocab_size = lm.vocab_size
        self.tokenizer = lm.tokenizer
        self.device = str(lm.device)
        self.threads = options.threads or torch.get_num_threads()
        self.max_batch = max_batch = options.max_batch_size
        self.max_step_tokens = max(options.max_step_tokens, max_batch + 1)
        self.profile = StepProfile()
        self._eos = frozenset(lm.eos_token_ids)
        self.grammars = Grammars(lm.tokenizer, lm.vocab_size, sorted(self._eos))
        self.sampler = Sampler(lm.vocab_size, grammars=self.grammars)
        # Default: room for every batch row at 2k tokens (or the context, if
        # shorter); enough for chat on CPU without taking all memory.
        kv_cache_tokens = options.kv_cache_tokens or max_batch * min(lm.context_length, 2048)
        self.cache = _cache_for(lm, kv_cache_tokens, options.prefix_caching)
        self.loras = LoraBank(lm.model, spec, options.max_loras, options.max_lora_rank)
        for name, path in options.loras:  # checked whole at start: a bad one stops the worker with the reason
            self.loras.check(self.loras.serve(name, path))
        self.tool_format = format_for(lm.tokenizer, options.tool_call_parser)
        self.emitter = Emitter(publisher, self.tool_format, options.stream_interval)
        self._lock = threading.Lock()
        self._inbox: list[Run] = []
        self._wake = threading.Event()
        self._waiting: deque[Run] = deque()  # engine thread only, from here down
        self._running: list[Run] = []  # in admission order
        self._stopping = threading.Event()
        self.preemptions = 0
        lm.model.set_attn_implementation(ATTENTION)
        name = lm.names[0]
        self._loop_thread = threading.Thread(target=self._loop, name=f"llmq-engine-{name}", daemon=True)
        self._pump: Pump[StepOutput] = Pump(f"llmq-pump-{name}", self._publish_step)

    def __repr__(self) -> str:
        return f"Engine(model={self.lm.names[0]!r}, running={self.emitter.running}, cache={self.cache!r})"

    # ------------------------------------------------------------ control

    def start(self) -> None:
        self._loop_thread.start()
        self._pump.start()

    def stop(self) -> None:
        """Stop the engine; jobs still running end with an error event."""
        self._stopping.set()
        self._wake.set()
        self._loop_thread.join(timeout=30)
        self._pump.stop()
        n = self.emitter.fail_all(503, "worker_shutdown", "The worker running this job shut down before it finished.")
        if n:
            log.warning("stopped with %d running job(s); they ended with an error", n)

    def healthy(self) -> bool:
        return self._loop_thread.is_alive() or not self._loop_thread.ident

    def check(self, job: Job) -> None:
        """Every request option is honoured here; a grammar must compile and
        an adapter's tensors must be read and fit the model (in this Celery
        thread, not the step loop; both are kept)."""
        spec = spec_of(job, self.tool_format)
        if spec is not None:
            self.grammars.compile(spec)
        adapter = self.loras.adapters.get(job.model)
        if adapter is not None:
            try:
                self.loras.check(adapter)
            except AdapterError as exc:
                raise Refused(str(exc), "model", "invalid_adapter") from None

    @property
    def adapters(self) -> dict[str, Adapter]:
        """The LoRA adapters served as model names; ``loras`` serves them (lora.py)."""
        return self.loras.adapters

    def step_s(self) -> float:
        return self.profile.mean_step_s()

    def submit(self, job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
        spec = spec_of(job, self.tool_format)
        grammar = self.grammars.compile(spec) if spec is not None else None  # compiled by check(): cached
        adapter = self.adapters.get(job.model)
        name, salt = (None, None) if adapter is None else (adapter.name, hash(("lora", adapter.serial)))
        runs = [Run(job=job, index=i, prompt_ids=prompt_ids, max_tokens=max_tokens, queue_s=queue_s, grammar=grammar,
                    adapter=name, cache_salt=salt, detok=IncrementalDetokenizer(self.tokenizer, prompt_ids))
                for i in range(job.n)]
        for run in runs:
            self.add(run)
        return list(runs)

    def add(self, run: Run) -> None:
        self.emitter.add([run])
        with self._lock:
            self._inbox.append(run)
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Free the job's batch rows at the next step. True if it was running."""
        runs = self.emitter.of_job(job_id)
        for run in runs:
            assert isinstance(run, Run)
            run.dropped = True
            self.emitter.end(run, "cancelled")
        if runs:
            self._wake.set()
            log.info("job %s: cancelled after %d tokens", job_id, sum(r.tokens for r in runs))
        return bool(runs)

    # ------------------------------------------------------- engine thread

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # per thread under OpenMP; see threads.py
        while not self._stopping.is_set():
            self._intake()
            if not self._running and not self._waiting:
                t = time.monotonic()
                self._wake.wait(0.5)
                self._wake.clear()
                self.profile.add("idle", time.monotonic() - t)
                continue
            try:
                self._step()
            except Exception as exc:  # one bad step must not end the engine for every later job
                log.exception("engine step failed; failing the %d sequence(s) in it", len(self._running))
                failed = [StepOutput(r, None, error=f"{type(exc).__name__}: {exc}") for r in self._running]
                for run in list(self._running):
                    self._retire(run)
                self._pump.put(failed)

    def _intake(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
        for run in new:
            s = run.job.sampling
            run.slot = self.sampler.open(s, None if s.seed is None else s.seed + run.index)
            if run.grammar is not None:  # a matcher per choice; freed with the run
                run.slot.matcher = self.grammars.matcher(run.grammar)
            self._waiting.append(run)
        for run in [r for r in self._running if r.dropped]:
            self._retire(run)
        for run in [r for r in self._waiting if r.dropped]:
            self._waiting.remove(run)
            self._retire(run)

    def _retire(self, run: Run) -> None:
        """Give back the run's KV blocks and sampler row (engine thread)."""
        if run in self._running:
            self._running.remove(run)
        self.cache.release(run.blocks)
        run.blocks = []
        if run.slot is not None:
            self.sampler.close(run.slot)
        if run.lora_slot:
            self.loras.release(run.lora_slot)
            run.lora_slot = 0

    def _step(self) -> None:
        t0 = time.monotonic()
        plan = self._schedule()
        if not plan:  # nothing fits in memory right now; finishing runs will free some
            self._wake.wait(0.01)
            return
        step, input_ids, positions, logit_at, lora_slots = layout(plan, self.cache, self.lm.device)
        t1 = time.monotonic()
        self.loras.arm(lora_slots, self.lm.device)
        try:
            with torch.inference_mode():
                out = self.lm.model(input_ids=input_ids, position_ids=positions, logits_to_keep=logit_at,
                                    use_cache=False, **{STEP_KWARG: step})
        finally:
            self.loras.disarm()
        t2 = time.monotonic()
        sampling = [r for r, n in plan if r.computed + n == len(r.ids)]
        slots: list[Slot] = [r.slot for r in sampling if r.slot is not None]
        tokens = self.sampler.sample(out.logits[0], slots) if slots else []
        t3 = time.monotonic()
        outputs = self._advance(plan, dict(zip(map(id, sampling), tokens)))
        if outputs:
            self._pump.put(outputs)
        decode = sum(1 for r, n in plan if n == 1)
        self.profile.step(decode_rows=decode, prefill_tokens=sum(n for _, n in plan) - decode, sampled=len(tokens),
                          schedule=t1 - t0, forward=t2 - t1, sample=t3 - t2, update=time.monotonic() - t3)

    def _schedule(self) -> Plan:
        """This step's (run, tokens to compute): decoders first, then prompt chunks."""
        cache, bs = self.cache, self.cache.block_size
        plan: Plan = []
        for run in list(self._running):
            if len(run.ids) - run.computed == 1 and run in self._running:
                if run.computed == len(run.blocks) * bs and not self._grow(run):
                    continue  # preempted itself: it was the newest
                plan.append((run, 1))
        budget = self.max_step_tokens - len(plan)
        for run in self._running:
            pending = len(run.ids) - run.computed
            if pending > 1 and budget > 0:
                n = self._reserve(run, min(pending, budget))
                if n:
                    plan.append((run, n))
                    budget -= n
        no_slot: list[Run] = []  # adapter runs that found every LoRA slot held: they keep their place
        while self._waiting and len(self._running) < self.max_batch and budget > 0:
            run = self._waiting[0]
            if run.adapter is not None and not run.lora_slot:
                if run.adapter not in self.loras.adapters:
                    self._waiting.popleft()
                    self._retire(run)
                    self._pump.put([StepOutput(run, None, error=(
                        f"the LoRA adapter {run.adapter!r} was unloaded while the job waited for a slot"))])
                    continue
                slot = self.loras.acquire(run.adapter)
                if slot is None:
                    no_slot.append(self._waiting.popleft())
                    continue
                run.lora_slot = slot
            if not run.blocks and not run.computed:
                run.blocks, run.hashes = cache.match_prefix(run.ids, run.cache_salt)
                run.computed = len(run.blocks) * bs
                self.profile.add_cached(run.computed)
            if cache.blocks_for(len(run.ids) + 1) - len(run.blocks) > cache.available():
                if not self._running:  # even an empty cache cannot hold it
                    self._waiting.popleft()
                    self._retire(run)
                    self._pump.put([StepOutput(run, None, error=(
                        f"the prompt ({len(run.ids)} tokens) does not fit in this worker's KV cache "
                        f"({cache.num_blocks * bs} tokens); raise --kv-cache-tokens"))])
                    continue
                break  # wait for running sequences to give blocks back
            self._waiting.popleft()
            self._running.append(run)
            n = self._reserve(run, min(len(run.ids) - run.computed, budget))
            if n:
                plan.append((run, n))
                budget -= n
        self._waiting.extendleft(reversed(no_slot))
        return plan

    def _grow(self, run: Run) -> bool:
        """One more block for a decoding run, preempting the newest runs if
        memory is out. False if ``run`` itself was the one preempted."""
        while (block := self.cache.allocate()) is None:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is run:
                return False
        run.blocks.append(block)
        return True

    def _preempt(self, run: Run) -> None:
        log.info("job %s: KV cache full, preempted after %d tokens; it will be recomputed", run.job.job_id,
                 run.generated)
        self.preemptions += 1
        self._running.remove(run)
        self.cache.release(run.blocks)
        run.blocks, run.hashes, run.computed = [], [], 0
        self._waiting.appendleft(run)

    def _reserve(self, run: Run, n: int) -> int:
        """Blocks for up to ``n`` more tokens of ``run``; how many it got."""
        bs = self.cache.block_size
        while len(run.blocks) * bs < run.computed + n:
            block = self.cache.allocate()
            if block is None:
                return max(0, min(n, len(run.blocks) * bs - run.computed))
            run.blocks.append(block)
        return n

    def _advance(self, plan: Plan, tokens: dict[int, int]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for run, n in plan:
            run.computed += n
            self.cache.file_full_blocks(run.ids, run.blocks, run.hashes, run.computed, run.cache_salt)
            token = tokens.get(id(run))
            if token is None:
                continue  # a prompt chunk that does not end the prompt
            run.ids.append(token)
            finish: FinishReason | None = None
            if token in self._eos:
                finish = "stop"
            elif run.generated >= run.max_tokens:
                finish = "length"
            outputs.append(StepOutput(run, token, finish))
            if finish:
                self._retire(run)
        return outputs

    # --------------------------------------------------------------- pump

    def _publish_step(self, outputs: list[StepOutput]) -> None:
        """Tokens to text (stop strings applied, logprobs attached), then events."""
        t = time.monotonic()
        updates, dropped = updates_of(outputs, self.lm.tokenizer.decode)
        if dropped:
            self._wake.set()
        self.emitter.publish(updates)
        self.profile.add("publish", time.monotonic() - t)
