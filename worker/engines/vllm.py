"""The vLLM engine: vLLM's own async engine (``AsyncLLM``) inside the worker
process, not a second HTTP server.

vLLM schedules, batches, samples, detokenizes and applies stop strings; this
module maps a job onto one vLLM request (``n`` choices, parallel sampling
with seed + i per choice, as llmq's own engine does) and vLLM's streamed
deltas onto ``Update`` records. vLLM's engine core runs in a child process
of its own; its outputs arrive on an asyncio loop that lives in one thread
of this worker. Prompts are built by the runtime with the model's own
tokenizer and chat template and reach vLLM as token ids, so every engine
sees the same tokens for the same request.

vLLM pins its own transformers and torch, so it lives in a virtualenv of its
own (README, "Engines"); ``import vllm`` happens only here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from broker.schemas import FinishReason, Job, TokenLogprob
from worker.engines import EngineOptions
from worker.engines import vllm_plugin
from worker.engines.base import Choice, Emitter, LoopBatcher, StepClock, Update, choices_of
from worker.grammar import GrammarSpec, check_spec, spec_of
from worker.loading import ModelLoadError, ModelSpec, load_tokenizer
from worker.publish import Publisher
from worker.toolcalls import format_for

log = logging.getLogger("llmq.worker.engines.vllm")

T = TypeVar("T")

# vLLM's finish reasons; "abort" is a cancel, whose event llmq has already sent.
FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
STARTUP_TIMEOUT_S = 900.0  # first start on a CPU compiles kernels for minutes


def engine_args(spec: ModelSpec, options: EngineOptions) -> dict[str, Any]:
    """vLLM's engine arguments for a worker's options, named as vLLM names
    them (``vllm serve --help``); what the worker was not given is left to
    vLLM's defaults."""
    args: dict[str, Any] = {
        "model": spec.path,
        "served_model_name": list(spec.served_names()),
        "dtype": spec.dtype,
        "max_num_seqs": options.max_batch_size,
        "tensor_parallel_size": options.tensor_parallel_size,
        "enable_prefix_caching": options.prefix_caching,
        "enforce_eager": options.enforce_eager,
        "trust_remote_code": spec.trust_remote_code,
        "disable_log_stats": True,
    }
    if spec.revision:
        args["revision"] = spec.revision
    if options.max_model_len or spec.context_length:
        args["max_model_len"] = options.max_model_len or spec.context_length
    if options.gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = options.gpu_memory_utilization
    if options.quantization:
        args["quantization"] = options.quantization
    if spec.load_8bit or spec.load_4bit:
        raise ModelLoadError("--load-8bit/--load-4bit are bitsandbytes loading for --engine transformers; with "
                             "--engine vllm pass a quantized checkpoint and --quantization (awq, gptq, ...)")
    return args


def sampling_params(job: Job, max_tokens: int, grammar: GrammarSpec | None = None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = job.sampling
    return SamplingParams(
        n=job.n, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0),
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        logit_bias=dict(s.logit_bias) if s.logit_bias else None, seed=s.seed,
        stop=job.stop or None, logprobs=s.logprobs, output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured_outputs(grammar),
    )


def structured_outputs(grammar: GrammarSpec | None) -> Any:
    """llmq's grammar as vLLM's structured outputs (vLLM runs xgrammar itself).
    JSON without free whitespace, as the transformers engine generates it."""
    if grammar is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if grammar.kind == "json":
        return StructuredOutputsParams(json=grammar.value, disable_any_whitespace=True)
    if grammar.kind == "regex":
        return StructuredOutputsParams(regex=grammar.value)
    if grammar.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(grammar.value))
    if grammar.kind == "grammar":
        return StructuredOutputsParams(grammar=grammar.value)
    return StructuredOutputsParams(structural_tag=grammar.value)


class VllmEngine:
    kind = "vllm"

    def __init__(self, spec: ModelSpec, options: EngineOptions, publisher: Publisher) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelLoadError(f"--engine vllm: vLLM is not installed in this Python ({exc}); install it in its "
                                 "own virtualenv (README, 'Engines') and start the worker from there") from exc
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM's CPU recipe, as ../shared/anchors/vllm.sh runs its own server:
            # a 1 GiB KV cache (its default reserves 92% of RAM and refuses to
            # start beside anything else) and OpenMP threads on every core.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        self.device = str(current_platform.device_type)
        # vLLM's processes die with the worker (worker/engines/vllm_plugin.py).
        os.environ[vllm_plugin.ENV] = str(os.getpid())
        os.register_at_fork(after_in_child=vllm_plugin.die_with_parent)
        self.names = spec.served_names()
        self.tokenizer = load_tokenizer(spec)
        self.tool_format = format_for(self.tokenizer, options.tool_call_parser)
        self.emitter = Emitter(publisher, self.cancel, self.tool_format)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"llmq-vllm-{self.names[0]}",
                                             daemon=True)
        self._loop_thread.start()
        self._out = LoopBatcher(self._loop, self.emitter.publish)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # job id -> its generate task (loop thread only)
        self._clock = StepClock()
        args = AsyncEngineArgs(**engine_args(spec, options))

        async def make() -> Any:
            return AsyncLLM.from_engine_args(args)

        try:
            self.llm = self._call(make(), STARTUP_TIMEOUT_S)
        except Exception as exc:
            self._close_loop()
            raise ModelLoadError(f"--model-path {spec.path}: vLLM could not start: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        config = self.llm.model_config
        self.context_length = int(config.max_model_len)
        self.vocab_size = int(config.get_vocab_size())
        log.info("vLLM engine for %s on %s: context %d, %d sequences at once (pid %d)", ",".join(self.names),
                 self.device, self.context_length, options.max_batch_size, os.getpid())

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------ control

    def start(self) -> None:
        """Everything runs from the constructor on."""

    def stop(self) -> None:
        n = self.emitter.fail_all(503, "worker_shutdown", "The worker running this job shut down before it finished.")
        if n:
            log.warning("stopped with %d running job(s); they ended with an error", n)
        try:
            self.llm.shutdown()
        except Exception:
            log.exception("vLLM did not shut down cleanly")
        self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)

    def healthy(self) -> bool:
        return self._loop_thread.is_alive() and not self.llm.errored

    def check(self, job: Job) -> None:
        """vLLM honours every option llmq takes; a grammar must build (vLLM
        would fail it only once it runs, as an engine error)."""
        grammar = spec_of(job, self.tool_format)
        if grammar is not None:
            check_spec(grammar)

    def step_s(self) -> float:
        return self._clock.mean_s

    def submit(self, job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
        choices = choices_of(job, prompt_ids, max_tokens, queue_s)
        self.emitter.add(choices)
        self._loop.call_soon_threadsafe(self._start, job, prompt_ids, max_tokens, choices)
        return choices

    def cancel(self, job_id: str) -> bool:
        choices = self.emitter.of_job(job_id)
        for c in choices:
            self.emitter.end(c, "cancelled")
        if choices:
            self._loop.call_soon_threadsafe(self._abort, job_id)
            log.info("job %s: cancelled after %d tokens", job_id, sum(c.tokens for c in choices))
        return bool(choices)

    # --------------------------------------------------------- loop thread

    def _start(self, job: Job, prompt_ids: list[int], max_tokens: int, choices: list[Choice]) -> None:
        if all(c.finish_reason is not None for c in choices):
            return  # cancelled before it reached the loop
        task = self._loop.create_task(self._generate(job, prompt_ids, max_tokens, choices))
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.job_id, None))

    def _abort(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()  # vLLM's generate() aborts the request when its consumer is cancelled

    async def _generate(self, job: Job, prompt_ids: list[int], max_tokens: int, choices: list[Choice]) -> None:
        from vllm.inputs import TokensPrompt

        try:
            params = sampling_params(job, max_tokens, spec_of(job, self.tool_format))
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                               request_id=job.job_id):
                self._clock.tick()
                self._out.put([
                    Update(choices[o.index], text=o.text, tokens=len(o.token_ids),
                           logprobs=_logprobs(o.token_ids, o.logprobs, job.sampling.logprobs),
                           finish=FINISH.get(o.finish_reason) if o.finish_reason else None)
                    for o in out.outputs
                ])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s: vLLM failed it", job.job_id)
            self._out.put([Update(c, error=f"{type(exc).__name__}: {exc}") for c in choices])



def _logprobs(token_ids: Any, entries: Any, k: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-token {id: Logprob} (the sampled token's and the top k by
    rank) as llmq's records."""
    if k is None or not entries:
        return None
    out = []
    for token, entry in zip(token_ids, entries):
        chosen = entry[token]
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        out.append(TokenLogprob(token=chosen.decoded_token or "", logprob=float(chosen.logprob),
                                top=[(lp.decoded_token or "", float(lp.logprob)) for lp in top]))
    return out
