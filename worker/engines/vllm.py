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

A job for a LoRA adapter served with ``--lora`` (vLLM's ``--enable-lora``,
``--lora-modules``) carries vLLM's ``LoRARequest``; vLLM batches rows of
different adapters itself (its punica kernels; on CPU their torch form).

vLLM pins its own transformers and torch, so it lives in a virtualenv of its
own (README, "Engines"; ``python`` below); ``import vllm`` happens only here,
inside the functions that need it, so declaring the engine (``ENGINE``, with
its options, ``VllmOptions``) loads none of it. A job's request is a task on
the loop of ``worker/engines/loop.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import click

from broker.schemas import FinishReason, Job, TokenLogprob
from broker.settings import Settings
from worker.engines import vllm_plugin
from worker.engines.loop import LoopEngine, Request
from worker.engines.protocol import Update
from worker.engines.registry import EngineKind, EngineOptions
from worker.grammar import GrammarSpec, check_spec, spec_of
from worker.loading import ModelLoadError, ModelSpec, load_tokenizer
from worker.lora import Adapter
from worker.lora import read as read_adapter
from worker.publish import Publisher
from worker.toolcalls import format_for

log = logging.getLogger("llmq.worker.engines.vllm")

# vLLM's finish reasons; "abort" is a cancel, whose event llmq has already sent.
FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}
STARTUP_TIMEOUT_S = 900.0  # first start on a CPU compiles kernels for minutes
VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"  # make install-vllm
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


@dataclass(frozen=True, kw_only=True)
class VllmOptions(EngineOptions):
    """vLLM's engine arguments that a worker passes on, as vLLM names them."""

    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    quantization: str | None = None
    enforce_eager: bool = False

    @classmethod
    def read(cls, opts: Mapping[str, Any]) -> Self:
        return cls(**cls.common(opts), gpu_memory_utilization=opts.get("gpu_memory_utilization"),
                   tensor_parallel_size=opts.get("tensor_parallel_size") or 1,
                   max_model_len=opts.get("max_model_len"), quantization=opts.get("quantization"),
                   enforce_eager=bool(opts.get("enforce_eager")))


OPTIONS = [
    click.Option(["--gpu-memory-utilization"], type=float, default=None, help="vllm: share of GPU memory to use"),
    click.Option(["--tensor-parallel-size"], type=int, default=1, help="vllm: GPUs one model is split over"),
    click.Option(["--max-model-len"], type=int, default=None, help="vllm: context length served"),
    click.Option(["--quantization"], default=None, help="vllm: the checkpoint's quantization (awq, gptq, ...)"),
    click.Option(["--enforce-eager"], is_flag=True, default=False, help="vllm: no CUDA graphs / compilation"),
]


def python(settings: Settings) -> str:
    """vLLM pins its own torch and transformers, so it lives in a virtualenv
    of its own: LLMQ_VLLM_PYTHON (``settings.vllm_python``), else the
    checkout's .venv-vllm, else this Python."""
    path = str(settings.vllm_python or VENV / "bin" / "python")
    return path if Path(path).exists() else sys.executable


def engine_args(spec: ModelSpec, options: VllmOptions) -> dict[str, Any]:
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
    if options.loras:
        # vLLM sizes its LoRA buffers for max_loras adapters of max_lora_rank,
        # one of the ranks it has kernels for; every --lora adapter stays in
        # its CPU cache (max_cpu_loras), so none is read from disk twice.
        args.update(enable_lora=True, max_loras=options.max_loras, max_lora_rank=vllm_rank(options.max_lora_rank),
                    max_cpu_loras=max(options.max_loras, len(options.loras)))
    if spec.load_8bit or spec.load_4bit:
        raise ModelLoadError("--load-8bit/--load-4bit are bitsandbytes loading for --engine transformers; with "
                             "--engine vllm pass a quantized checkpoint and --quantization (awq, gptq, ...)")
    return args


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM takes as max_lora_rank that holds ``rank``."""
    fits = [r for r in VLLM_RANKS if r >= rank]
    if not fits:
        raise ModelLoadError(f"--max-lora-rank {rank}: vLLM takes ranks up to {VLLM_RANKS[-1]}")
    return fits[0]


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


class VllmEngine(LoopEngine):
    kind = "vllm"

    def __init__(self, spec: ModelSpec, options: VllmOptions, publisher: Publisher) -> None:
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
        self.tokenizer = load_tokenizer(spec)
        super().__init__(spec.served_names(), format_for(self.tokenizer, options.tool_call_parser), publisher,
                         stream_interval=options.stream_interval)
        args = AsyncEngineArgs(**engine_args(spec, options))

        async def make() -> Any:
            return AsyncLLM.from_engine_args(args)

        try:
            self.llm = self.call(make(), STARTUP_TIMEOUT_S)
        except Exception as exc:
            self.close_loop()
            raise ModelLoadError(f"--model-path {spec.path}: vLLM could not start: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        # LoRA adapters (--lora): checked by llmq (worker/lora.py), then added
        # to vLLM's CPU cache now, so one it cannot load stops the worker here.
        self.adapters: dict[str, Adapter] = {}
        self._lora_ids: dict[str, int] = {}
        for name, path in options.loras:
            if name in self.names or name in self.adapters:
                raise ModelLoadError(f"--lora {name}={path}: the name {name!r} is served already")
            self.adapters[name] = read_adapter(name, path, spec, options.max_lora_rank)
            self._lora_ids[name] = len(self._lora_ids) + 1  # vLLM's ids start at 1
            try:
                self.call(self.llm.add_lora(self._lora_request(name)), STARTUP_TIMEOUT_S)
            except Exception as exc:
                self.shut_down()
                self.close_loop()
                raise ModelLoadError(f"--lora {name}={path}: vLLM could not load it: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        config = self.llm.model_config
        self.context_length = int(config.max_model_len)
        self.vocab_size = int(config.get_vocab_size())
        log.info("vLLM engine for %s on %s: context %d, %d sequences at once (pid %d)", ",".join(self.names),
                 self.device, self.context_length, options.max_batch_size, os.getpid())

    def _lora_request(self, model: str) -> Any:
        """vLLM's LoRARequest for a job of ``model`` (None: the base)."""
        adapter = self.adapters.get(model)
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=model, lora_int_id=self._lora_ids[model], lora_path=str(adapter.path))

    def shut_down(self) -> None:
        try:
            self.llm.shutdown()
        except Exception:
            log.exception("vLLM did not shut down cleanly")

    def healthy(self) -> bool:
        return self._loop_thread.is_alive() and not self.llm.errored

    def check(self, job: Job) -> None:
        """vLLM honours every option llmq takes; a grammar must build (vLLM
        would fail it only once it runs, as an engine error)."""
        grammar = spec_of(job, self.tool_format)
        if grammar is not None:
            check_spec(grammar)

    async def generate(self, request: Request) -> None:
        """One vLLM request for all the job's choices; cancelling this task
        makes vLLM abort it."""
        from vllm.inputs import TokensPrompt

        job, choices = request.job, request.choices
        params = sampling_params(job, request.max_tokens, spec_of(job, self.tool_format))
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=request.prompt_ids), params,
                                           request_id=job.job_id, lora_request=self._lora_request(job.model)):
            self.tick()
            self.put([
                Update(choices[o.index], text=o.text, tokens=len(o.token_ids),
                       logprobs=_logprobs(o.token_ids, o.logprobs, job.sampling.logprobs),
                       finish=FINISH.get(o.finish_reason) if o.finish_reason else None)
                for o in out.outputs
            ])


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


ENGINE = EngineKind(name="vllm", engine="worker.engines.vllm:VllmEngine", summary="vllm (its own virtualenv)",
                    options_type=VllmOptions, options=OPTIONS, python=python, loras="start")
