"""The synthetic engine: no weights, no torch, a set pace.

``llmq worker --engine synthetic`` takes jobs from the same queue as any
engine, claims them, beats the heart and streams real text tokens, but
computes nothing: every step of ``--synthetic-step-ms`` gives each running
row one token; a step that admits new prompts takes ``--synthetic-prefill-us``
longer per prompt token (a real engine's batch stalls for prefill too); at
most ``--max-batch-size`` rows run at once (``llmq worker --concurrency``),
the rest wait for a row to end. It is what a deployment is load-tested with
before its GPUs arrive (the role of llm-d's inference simulator), and what
llmq's serving-layer tests and ``llmq bench capacity`` run on: every token
still crosses llmq's own path (the worker's relay, Redis, the API, SSE).

Its text: from the tokenizer of ``--model-path`` when one is given (a model
directory: the tokenizer and chat template are all it reads), else from its
own word list (``words.py``), so it starts with nothing but ``--model-name``.
It honours ``n``, ``stop``, ``max_tokens``, ``logit_bias`` on the end token
(banned: the answer runs to ``max_tokens``), logprobs, cancellation, JSON
schemas and choices (an answer that matches), and tool calls that
``tool_choice`` asks for (``answers.py``); regex and EBNF grammars are
refused with a 400.

This module only declares it; the engine is ``engine.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import click

from worker.engines.registry import EngineKind, EngineOptions

STEP_MS = 20.0
PREFILL_US = 20.0  # per prompt token: ~50k tokens/s of prefill, a small model on one GPU
OUTPUT_TOKENS = 256


@dataclass(frozen=True, kw_only=True)
class SyntheticOptions(EngineOptions):
    step_s: float = STEP_MS / 1000
    prefill_s_per_token: float = PREFILL_US / 1e6
    output_tokens: int = OUTPUT_TOKENS

    @classmethod
    def read(cls, opts: Mapping[str, Any]) -> Self:
        def given(name: str, default: float) -> float:
            value = opts.get(name)
            return default if value is None else value

        return cls(**cls.common(opts), step_s=given("synthetic_step_ms", STEP_MS) / 1000,
                   prefill_s_per_token=given("synthetic_prefill_us", PREFILL_US) / 1e6,
                   output_tokens=int(given("synthetic_output_tokens", OUTPUT_TOKENS)))


OPTIONS = [
    click.Option(["--synthetic-step-ms"], type=click.FloatRange(min=0), default=STEP_MS,
                 help="synthetic: ms one step takes; each running row gets a token a step"),
    click.Option(["--synthetic-prefill-us"], type=click.FloatRange(min=0), default=PREFILL_US,
                 help="synthetic: µs a prompt token adds to the step that admits it"),
    click.Option(["--synthetic-output-tokens"], type=click.IntRange(min=1), default=OUTPUT_TOKENS,
                 help="synthetic: tokens of an answer that neither max_tokens nor a stop string ends first"),
]

ENGINE = EngineKind(name="synthetic", engine="worker.engines.synthetic.engine:SyntheticEngine",
                    summary="synthetic (no weights: a set pace, for load tests)", options_type=SyntheticOptions,
                    options=OPTIONS, weights=False)
