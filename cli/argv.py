"""The command lines llmq starts its workers with: ``llmq worker`` execs one,
``llmq up`` spawns two. Both import them from here."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from broker.keys import queue_name

if TYPE_CHECKING:
    from broker.settings import Settings  # pydantic: kept out of `llmq --help`

def engine_python(engine: str, settings: Settings) -> str:
    """The Python that runs a worker of this engine: the one its declaration
    names (vLLM: its own virtualenv), else this one."""
    from worker.engines.registry import kind_of  # declarations only: no engine library loads

    python = kind_of(engine).python
    return python(settings) if python is not None else sys.executable


def worker_argv(model_paths: list[str], model_names: list[str], concurrency: int, extra: list[str],
                engine: str = "transformers", *, settings: Settings) -> list[str]:
    """The exact ``celery worker`` command line ``llmq worker`` runs."""
    from worker.loading import ModelSpec  # no torch import: loading imports it lazily

    served: list[str] = []
    models: list[str] = []
    for i in range(max(len(model_paths), len(model_names))):  # names past the paths: models with no files
        path = model_paths[i] if i < len(model_paths) else ""
        names = tuple(n for n in model_names[i].split(",") if n) if i < len(model_names) else ()
        served.extend(ModelSpec(path=path, names=names).served_names())
        models += ["--model-path", path] if i < len(model_paths) else []
        models += ["--model-name", model_names[i]] if i < len(model_names) else []
    return [
        engine_python(engine, settings), "-m", "celery", "-A", "worker.app", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--hostname", f"llmq-{served[0]}@%h" if served else "llmq@%h",
        "--queues", ",".join(queue_name(n) for n in served),
        "--task-events", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        "--max-batch-size", str(concurrency), "--engine", engine, *models, *extra,
    ]
