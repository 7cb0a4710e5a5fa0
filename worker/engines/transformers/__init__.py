"""The transformers engine (the default): llmq's own continuous batching over
the model's transformers forward; every Hugging Face causal LM, 8-bit and
4-bit bitsandbytes loading.

This module only declares it (no torch here); its parts:

- ``engine.py``: the ``Engine``: its step thread (scheduling, forward,
  sampling, preemption) and its pump thread (text and events);
- ``runs.py``: a run (one choice in the engine) and a step's layout for the
  forward;
- ``attention.py``: the attention function the model runs over the paged
  KV cache; ``kvcache.py``: that cache, with prefix caching;
- ``sampler.py``: the next token of every row of a step at once;
  ``grammars.py``: xgrammar's masks for constrained rows;
- ``detok.py``, ``stops.py``: tokens to final text, stop strings applied;
- ``lora.py``: LoRA adapters served as model names, many in one batch
  (the adapter files: ``worker/lora.py``);
- ``profile.py``: where a step's time goes (``llmq bench profile``);
- ``threads.py``: torch's CPU threads, kept for the engine threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Self

import click

from worker.engines.registry import EngineKind, EngineOptions

MAX_STEP_TOKENS = 256


@dataclass(frozen=True, kw_only=True)
class TransformersOptions(EngineOptions):
    max_step_tokens: int = MAX_STEP_TOKENS
    threads: int | None = None  # torch CPU threads of each engine thread (threads.py); None: torch's count

    @classmethod
    def read(cls, opts: Mapping[str, Any]) -> Self:
        return cls(**cls.common(opts), max_step_tokens=opts.get("max_step_tokens") or MAX_STEP_TOKENS)


OPTIONS = [
    click.Option(["--max-step-tokens"], type=int, default=MAX_STEP_TOKENS,
                 help="tokens one engine step computes: every decoding sequence's next token, then prompt chunks"),
]


def before_load(options: TransformersOptions) -> TransformersOptions:
    """Before any torch work in the worker's main thread (``threads.py``)."""
    from worker.engines.transformers.threads import engine_threads

    return replace(options, threads=engine_threads())


ENGINE = EngineKind(name="transformers", engine="worker.engines.transformers.engine:Engine",
                    summary="transformers (default)", options_type=TransformersOptions, options=OPTIONS,
                    before_load=before_load, loras="runtime")
