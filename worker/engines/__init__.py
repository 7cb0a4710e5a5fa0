"""The engines a worker can run its models with, behind one interface
(``worker/engines/base.py``):

- ``transformers`` (default): llmq's own continuous batching over the
  model's transformers forward; every Hugging Face causal LM, 8-bit and
  4-bit bitsandbytes loading.
- ``vllm``: vLLM's async engine in the worker process; installed in a
  virtualenv of its own (it pins an older transformers).
- ``llama.cpp``: a ``llama-server`` child process the worker owns, for GGUF
  files.

Each module is imported only when its engine is picked, so a worker never
imports the libraries of an engine it does not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from worker.engines.base import Engine
    from worker.loading import ModelSpec
    from worker.publish import Publisher

EngineKind = Literal["transformers", "vllm", "llama.cpp"]
# worker/toolcalls.py's formats, named here so that reading options imports no engine.
TOOL_FORMATS = ("hermes", "llama3_json", "mistral", "generic")
ENGINES: tuple[EngineKind, ...] = ("transformers", "vllm", "llama.cpp")
MAX_STEP_TOKENS = 256


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    engine: EngineKind = "transformers"
    max_batch_size: int = 16
    kv_cache_tokens: int | None = None
    tool_call_parser: str | None = None  # one of TOOL_FORMATS; None: from the chat template
    # transformers
    max_step_tokens: int = MAX_STEP_TOKENS
    prefix_caching: bool = True
    threads: int | None = None  # torch CPU threads of each engine thread (engine_threads())
    # vllm, as its engine arguments name them
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    quantization: str | None = None
    enforce_eager: bool = False
    # llama.cpp
    llama_server: str | None = None  # the binary; default .engines/llama-server (scripts/install-llamacpp.sh)
    n_gpu_layers: int | None = None


def build(specs: Sequence[ModelSpec], options: EngineOptions, publisher: Publisher) -> list[Engine]:
    """Load each model into the picked engine; raises ``ModelLoadError``."""
    if options.engine == "vllm":
        from worker.engines.vllm import VllmEngine

        return [VllmEngine(spec, options, publisher) for spec in specs]
    if options.engine == "llama.cpp":
        from worker.engines.llamacpp import LlamaCppEngine

        return [LlamaCppEngine(spec, options, publisher) for spec in specs]
    from worker.engines.transformers import Engine as TransformersEngine, engine_kwargs
    from worker.loading import load

    engines: list[Engine] = []
    for spec in specs:
        lm = load(spec)
        engines.append(TransformersEngine(lm, publisher, **engine_kwargs(options, lm.context_length)))
    return engines
