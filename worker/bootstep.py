"""The Celery bootstep that owns the llmq runtime: it loads the models when
the worker is built (so a bad path fails before the worker registers),
subscribes the worker to each model's queue, and starts and stops the
engines, heartbeat and cancel listener with the worker.

``worker_process_init`` never fires under the threads pool, hence a bootstep.

The worker's options are its own (``OPTIONS``) and every registered
engine's (``worker/engines/registry.py``); ``--engine`` picks the one whose
declaration builds the engines.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import click
from celery import Celery, bootsteps

from broker.connections import sync_redis
from broker.settings import Settings
from worker.embeddings import is_embedding_model, load_embedding
from worker.engines.registry import DEFAULT, MAX_LORA_RANK, MAX_LORAS, TOOL_FORMATS, EngineKind, kind_of, kinds
from worker.hubwake import HubWaker
from worker.loading import ModelLoadError, ModelSpec
from worker.publish import Publisher
from worker.runtime import Runtime
from worker.tasks import wake_after_each_job

log = logging.getLogger("llmq.worker")

GATE_TICK_S = 0.1  # the batch gate looks at the threads' use this often (worker/batchgate.py)

OPTIONS = [
    click.Option(["--engine"], type=click.Choice(list(kinds())), default=DEFAULT,
                 help="what runs the model: " + ", ".join(k.summary or k.name for k in kinds().values())),
    click.Option(["--model-path"], multiple=True, help="model directory, Hugging Face id or .gguf file; repeatable"),
    click.Option(["--model-name"], multiple=True,
                 help="served name(s) for the model-path at the same position, comma-separated; repeatable"),
    click.Option(["--revision"], default=None, help="Hugging Face revision"),
    click.Option(["--dtype"], type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto"),
    click.Option(["--device"], default="auto", help="auto, cpu, cuda, cuda:N"),
    click.Option(["--chat-template"], default=None, help="Jinja chat template file for models without one"),
    click.Option(["--context-length"], type=int, default=None, help="override the model's context length"),
    click.Option(["--max-batch-size"], type=int, default=16, help="jobs batched at once; match --concurrency"),
    click.Option(["--batch-reserve"], type=int, default=2,
                 help="threads a worker keeps free of batch lines for interactive jobs (worker/batchgate.py)"),
    click.Option(["--kv-cache-tokens"], type=int, default=None, help="KV cache size in tokens"),
    click.Option(["--prefix-caching/--no-prefix-caching"], default=True,
                 help="reuse the KV cache of prompt prefixes seen before (chat turns, shared system prompts)"),
    click.Option(["--trust-remote-code"], is_flag=True, default=False),
    click.Option(["--stream-interval"], type=click.IntRange(min=1), default=1,
                 help="tokens per published update after a choice's first, as FastChat's model worker takes it"),
    click.Option(["--tool-call-parser"], type=click.Choice(TOOL_FORMATS), default=None,
                 help="how the model writes tool calls; default: read from its chat template, else generic"),
    click.Option(["--lora"], multiple=True, metavar="NAME=PATH",
                 help="serve a LoRA adapter of the model as model NAME (transformers, vllm: a PEFT directory; "
                      "llama.cpp: a GGUF LoRA file); repeatable"),
    click.Option(["--lora-dir"], default=None, metavar="DIR",
                 help="transformers: serve each PEFT adapter directory in DIR as a model of its directory's name, "
                      "found while the worker runs and read on first use"),
    click.Option(["--max-loras"], type=click.IntRange(min=1), default=MAX_LORAS,
                 help="transformers, vllm: adapters resident at once (the least recently used one gives way)"),
    click.Option(["--max-lora-rank"], type=click.IntRange(min=1), default=MAX_LORA_RANK,
                 help="transformers, vllm: the highest adapter rank taken; a higher one is refused"),
    click.Option(["--load-8bit"], is_flag=True, default=False, help="8-bit weights (bitsandbytes)"),
    click.Option(["--load-4bit"], is_flag=True, default=False, help="4-bit NF4 weights (bitsandbytes)"),
    click.Option(["--num-gpus"], type=int, default=1, help="spread each model over this many GPUs"),
    click.Option(["--max-gpu-memory"], default=None, help="memory per GPU for the weights, e.g. 20GiB"),
    # Each engine's own (worker/engines/registry.py), e.g. --llama-server for llama.cpp:
    *(option for kind in kinds().values() for option in kind.options),
]


def specs_from_options(opts: dict[str, Any], kind: EngineKind) -> list[ModelSpec]:
    """One spec per model (``EngineKind.models_problem`` says which options serve one)."""
    paths: tuple[str, ...] = opts.get("model_path") or ()
    names: tuple[str, ...] = opts.get("model_name") or ()
    problem = kind.models_problem(paths, names)
    if problem is not None:
        raise ModelLoadError(problem)
    paths = paths + ("",) * (len(names) - len(paths))
    specs = []
    for i, path in enumerate(paths):
        served = tuple(n.strip() for n in names[i].split(",") if n.strip()) if i < len(names) else ()
        specs.append(ModelSpec(
            path=path, names=served, revision=opts.get("revision"), dtype=opts.get("dtype") or "auto",
            device=opts.get("device") or "auto", chat_template=opts.get("chat_template"),
            context_length=opts.get("context_length"), trust_remote_code=bool(opts.get("trust_remote_code")),
            load_8bit=bool(opts.get("load_8bit")), load_4bit=bool(opts.get("load_4bit")),
            num_gpus=opts.get("num_gpus") or 1, max_gpu_memory=opts.get("max_gpu_memory"),
        ))
    served_all = [n for s in specs for n in s.served_names()]
    if len(set(served_all)) != len(served_all):
        raise ModelLoadError(f"a served model name is used twice: {served_all}")
    return specs


class LLMQStep(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **opts: Any) -> None:
        super().__init__(worker, **opts)
        app = worker.app
        settings: Settings = app.llmq_settings
        kind = kind_of(opts.get("engine") or DEFAULT)
        lora = bool(opts.get("lora") or opts.get("lora_dir"))
        problem = kind.lora_problem(opts)
        if problem is not None:
            raise SystemExit(f"llmq worker: cannot start: {problem}")
        publisher = Publisher(sync_redis(settings), settings.responses_stream_max_events, settings.responses_ttl_s)
        try:
            options = kind.options_type.read(opts)
            if kind.before_load is not None:
                options = kind.before_load(options)
            specs = specs_from_options(opts, kind)
            embed = [s for s in specs if is_embedding_model(s.path)]
            if lora and len(specs) - len(embed) != 1:
                raise ModelLoadError("--lora and --lora-dir adapters need exactly one --model-path (their base) in "
                                     "the worker")
            build = kind.engine_class()
            engines = [build(s, options, publisher) for s in specs if not is_embedding_model(s.path)]
            embedders = [load_embedding(s) for s in embed]
        except ModelLoadError as exc:
            # One clear line, and no registration: the heartbeat never starts.
            raise SystemExit(f"llmq worker: cannot start: {exc}") from None
        self.runtime = Runtime(settings, engines, embedders, publisher, options,
                               worker_id=f"{worker.hostname}-{os.getpid()}", redelivery=app.llmq_redelivery,
                               batch_reserve=opts.get("batch_reserve", 2))
        for queue in [*self.runtime.queues(), *self.runtime.batch_queues()]:
            app.amqp.queues.select_add(queue)
        app.llmq_runtime = self.runtime

    def start(self, worker: Any) -> None:
        self.runtime.start()
        # The startup heap (torch, transformers, the engine: objects that
        # live as long as the process) leaves the garbage collector's view,
        # as vLLM's own server does with its heap: a full collection walked
        # it in 270-720 ms with every thread of the worker stopped, so jobs
        # sat in the queue and streams paused that long (seen with the vLLM
        # engine at 16 clients).
        gc.collect()
        gc.freeze()
        hub = getattr(worker, "hub", None)
        if hub is not None:
            # The batch gate opens and closes the batch queues on Celery's
            # consumer thread only: on a slow tick, and whenever a job ends
            # (a thread freed is room for a batch line). That wake-up also
            # makes kombu ask for the next job at once (worker/hubwake.py).
            def gate() -> None:
                consumer = getattr(worker, "consumer", None)
                if consumer is not None:
                    self.runtime.intake.apply(consumer)
                self.runtime.gate.apply(consumer)

            def tick() -> None:
                gate()
                hub.call_later(GATE_TICK_S, tick)

            tick()
            wake_after_each_job(worker.app, HubWaker(hub, gate))

    def stop(self, worker: Any) -> None:
        self.runtime.stop()


def install(app: Celery, settings: Settings) -> None:
    app.llmq_settings = settings  # type: ignore[attr-defined]
    for option in OPTIONS:
        app.user_options["worker"].add(option)
    app.steps["worker"].add(LLMQStep)
