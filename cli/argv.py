"""The command lines llmq starts its workers with: ``llmq worker`` execs one,
``llmq up`` spawns two. Both import them from here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.keys import queue_name

if TYPE_CHECKING:
    from broker.settings import Settings  # pydantic: kept out of `llmq --help`

VLLM_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"  # make install-engines


def engine_python(engine: str, settings: Settings) -> str:
    """The Python that runs a worker of this engine: vLLM lives in a
    virtualenv of its own (LLMQ_VLLM_PYTHON, else the checkout's .venv-vllm);
    the other engines run in this one."""
    if engine != "vllm":
        return sys.executable
    python = str(settings.vllm_python or VLLM_VENV / "bin" / "python")
    return python if Path(python).exists() else sys.executable


def worker_argv(model_paths: list[str], model_names: list[str], concurrency: int, extra: list[str],
                engine: str = "transformers", *, settings: Settings) -> list[str]:
    """The exact ``celery worker`` command line ``llmq worker`` runs."""
    from worker.loading import ModelSpec  # no torch import: loading imports it lazily

    served = []
    for i, path in enumerate(model_paths):
        names = tuple(n for n in model_names[i].split(",") if n) if i < len(model_names) else ()
        served.extend(ModelSpec(path=path, names=names).served_names())
    argv = [
        engine_python(engine, settings), "-m", "celery", "-A", "worker.app", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--hostname", f"llmq-{served[0]}@%h" if served else "llmq@%h",
        "--queues", ",".join(queue_name(n) for n in served),
        "--task-events", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        "--max-batch-size", str(concurrency), "--engine", engine,
    ]
    for i, path in enumerate(model_paths):
        argv += ["--model-path", path]
        if i < len(model_names):
            argv += ["--model-name", model_names[i]]
    return argv + extra
