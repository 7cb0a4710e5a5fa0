"""The engine interface: what the runtime (``worker/runtime.py``) sees of an
engine, and the records an engine produces.

The runtime pulls jobs, claims them, publishes ``Started`` and beats the
heart without knowing which engine runs a job. It asks the engine for the
job's choices (``submit``) and waits for each one's ``ended``. An engine
turns each step of its work into ``Update`` records (new text, token count,
logprobs, finish, or an error, per choice) and hands them to its
``Emitter`` (``worker/engines/emitter.py``), which makes them events.

Every engine class is built the same way, ``Cls(spec, options, publisher)``
(``EngineClass``), by the registry (``worker/engines/registry.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from broker.schemas import FinishReason, Job, TokenLogprob

if TYPE_CHECKING:
    from worker.engines.emitter import Emitter
    from worker.engines.registry import EngineOptions
    from worker.loading import ModelSpec
    from worker.publish import Publisher
    from worker.toolcalls import ToolCallParser, ToolFormat


class Refused(Exception):
    """A job this engine cannot run as asked: a 400 naming the parameter."""

    def __init__(self, message: str, param: str | None, code: str = "unsupported_parameter") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(eq=False)
class Choice:
    """One choice of one job, from submit to its last event."""

    job: Job
    index: int
    prompt_ids: list[int]
    max_tokens: int
    queue_s: float
    submitted: float = field(default_factory=time.monotonic)
    tokens: int = 0  # published so far
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    tool_parser: ToolCallParser | None = None  # set by the Emitter when the job may call tools

    @property
    def request_id(self) -> str:
        return f"{self.job.job_id}/{self.index}"


def choices_of(job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
    """A job's ``n`` choices, for engines that need no state of their own per choice."""
    return [Choice(job=job, index=i, prompt_ids=prompt_ids, max_tokens=max_tokens, queue_s=queue_s)
            for i in range(job.n)]


@dataclass(frozen=True, slots=True)
class Update:
    """What one step did for one choice. ``text`` is final: stop strings
    applied, nothing held back that a later step could take back."""

    choice: Choice
    text: str = ""
    tokens: int = 0  # new tokens
    logprobs: list[TokenLogprob] | None = None
    finish: FinishReason | None = None
    error: str | None = None


class Engine(Protocol):
    """One loaded model behind one engine; the runtime's only view of it."""

    kind: str  # its registry name: "transformers", "vllm", "llama.cpp", ...
    names: tuple[str, ...]  # served names
    context_length: int
    vocab_size: int
    tokenizer: Any  # a Hugging Face tokenizer: chat template, encode, decode
    device: str
    tool_format: ToolFormat  # how this model writes tool calls (worker/toolcalls.py)
    emitter: Emitter

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop; choices still live end with an error event."""

    def check(self, job: Job) -> None:
        """Raise ``Refused`` for a request option this engine cannot honour
        (or a grammar it cannot build)."""

    def submit(self, job: Job, prompt_ids: list[int], max_tokens: int, queue_s: float) -> list[Choice]:
        """Start the job's choices; each one's ``ended`` is set after its last event."""

    def cancel(self, job_id: str) -> bool:
        """Stop the job's choices at the next step; True if any was live.
        Called from any thread."""

    def healthy(self) -> bool: ...

    def step_s(self) -> float: ...


# How every engine is built: one served model (raise ``ModelLoadError`` if it
# cannot be loaded), the engine's own options, and the worker's publisher.
EngineClass = Callable[["ModelSpec", "EngineOptions", "Publisher"], Engine]
