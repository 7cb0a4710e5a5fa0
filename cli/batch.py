"""``llmq batch``: OpenAI's Batch API from the terminal (submit, status, results).

Like ``llmq chat`` it talks to the API with the official ``openai`` SDK, so it
works against llmq or any other OpenAI-compatible server. The SDK is imported
inside the commands: ``llmq --help`` stays fast.

Exit codes: 0 done; 1 the server refused or could not be reached (its message
on one line), the batch ended failed, expired or cancelled, or ``results`` has
nothing to download yet; 130 Ctrl-C while waiting (the batch goes on).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import Batch

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="OpenAI's Batch API: submit a JSONL file of requests, follow it, download its results.")

# OpenAI's batch statuses: the ones a batch never leaves, and of those the
# ones that mean it did not run to the end.
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
UNSUCCESSFUL = frozenset({"failed", "expired", "cancelled"})
POLL_S = 1.0  # between two looks at a batch being waited on
# Attempts per look while waiting: a wait of hours should outlive an API restart.
WAIT_RETRIES = 5
TIMESTAMPS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at", "expires_at")

BaseUrl = Annotated[str, typer.Option(help="llmq's OpenAI API")]
ApiKey = Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key")]
Wait = Annotated[bool, typer.Option("--wait", help="follow the batch with a progress bar until it ends")]
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def _client(base_url: str, api_key: str) -> OpenAI:
    from openai import OpenAI

    # No silent retries for what changes state: a retried create could make two batches.
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


@contextmanager
def _server_errors() -> Iterator[None]:
    """The server's message on one line and exit 1, instead of a traceback."""
    import openai

    from cli.chat import describe

    try:
        yield
    except openai.APIError as exc:
        typer.echo(f"error: {describe(exc)}", err=True)
        raise typer.Exit(1) from None


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    """``k=v`` strings as OpenAI's metadata object (the value may hold ``=``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        out[key] = value
    return out


def counts_of(batch: Batch) -> tuple[int, int, int]:
    """(total, completed, failed); all 0 before the input is validated."""
    c = batch.request_counts
    return (c.total, c.completed, c.failed) if c is not None else (0, 0, 0)


def summary(batch: Batch) -> str:
    total, completed, failed = counts_of(batch)
    return f"{batch.id} {batch.status}: {completed} completed, {failed} failed of {total}"


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds") if ts else ""


def describe_batch(batch: Batch) -> list[str]:
    """What ``status`` prints: one ``name  value`` line each, errors last."""
    total, completed, failed = counts_of(batch)
    rows: list[tuple[str, Any]] = [
        ("id", batch.id), ("status", batch.status), ("endpoint", batch.endpoint),
        ("requests", f"{total} total, {completed} completed, {failed} failed"),
        ("input_file_id", batch.input_file_id), ("output_file_id", batch.output_file_id),
        ("error_file_id", batch.error_file_id),
        *((name, _when(getattr(batch, name, None))) for name in TIMESTAMPS),
        ("metadata", " ".join(f"{k}={v}" for k, v in (batch.metadata or {}).items())),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows if value] + error_lines(batch)


def error_lines(batch: Batch) -> list[str]:
    """The batch's own errors (a failed batch's: why its input was refused),
    each with the input line it is about; not the failed lines' answers,
    which are in the error file."""
    errors = (batch.errors.data if batch.errors else None) or []
    lines = ["errors:"] if errors else []
    for err in errors:
        where = f"line {err.line}" if err.line is not None else "batch"
        code = f" [{err.code}]" if err.code else ""
        param = f" (param {err.param})" if err.param else ""
        lines.append(f"  {where}{code}: {err.message or ''}{param}")
    return lines


def _retrieve(client: OpenAI, batch_id: str) -> Batch:
    # Only lookups retry (they change nothing), with the SDK's backoff.
    return client.with_options(max_retries=WAIT_RETRIES).batches.retrieve(batch_id)


def follow(client: OpenAI, batch: Batch, interval_s: float = POLL_S) -> Batch:
    """Poll until the batch is final, drawing completed + failed of total on
    stderr (stdout keeps only what scripts read); the final Batch."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(batch.status, total=None)
        while True:
            total, completed, failed = counts_of(batch)
            # No total yet while validating: an indeterminate bar, not 0 of 0.
            progress.update(task, description=batch.status, total=total or None, completed=completed + failed)
            if batch.status in FINAL:
                return batch
            time.sleep(interval_s)
            batch = _retrieve(client, batch.id)


def _wait(client: OpenAI, batch: Batch) -> Batch:
    try:
        return follow(client, batch)
    except KeyboardInterrupt:
        typer.echo(f"stopped waiting; {batch.id} goes on (llmq batch status {batch.id} --wait)", err=True)
        raise typer.Exit(130) from None


def _finish(client: OpenAI, batch: Batch, wait: bool) -> None:
    """With ``--wait``, follow the batch and exit 1 unless it completed."""
    if not wait:
        return
    batch = _wait(client, batch)
    typer.echo(summary(batch))
    if batch.status in UNSUCCESSFUL:
        for line in error_lines(batch):
            typer.echo(line, err=True)
        raise typer.Exit(1)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="JSONL: one {custom_id, method, url, body} request a line")],
    endpoint: Annotated[str, typer.Option(help="the endpoint every line goes to")] = "/v1/chat/completions",
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE kept with the batch; repeatable")] = None,
    wait: Wait = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = "none",
) -> None:
    """Upload FILE, create a batch of it and print the batch's id."""
    meta = parse_metadata(metadata or [])
    client = _client(base_url, api_key)
    with _server_errors():
        with file.open("rb") as fh:
            uploaded = client.files.create(file=(file.name, fh), purpose="batch")
        typer.echo(f"uploaded {file} as {uploaded.id}", err=True)
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=cast(Any, endpoint),
                                      completion_window="24h", metadata=meta or None)
        typer.echo(batch.id)
        _finish(client, batch, wait)


@app.command()
def status(
    batch_id: Annotated[str, typer.Argument(metavar="ID", help="the batch's id")],
    wait: Wait = False,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = "none",
) -> None:
    """Print a batch's status, counts, timestamps, files and errors."""
    client = _client(base_url, api_key)
    with _server_errors():
        batch = client.batches.retrieve(batch_id)
        if wait and batch.status not in FINAL:
            batch = _wait(client, batch)
        for line in describe_batch(batch):
            typer.echo(line)
        if wait and batch.status in UNSUCCESSFUL:
            raise typer.Exit(1)


def _download(client: OpenAI, file_id: str, target: Path) -> int:
    data = client.files.content(file_id).read()
    if str(target) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@app.command()
def results(
    batch_id: Annotated[str, typer.Argument(metavar="ID", help="the batch's id")],
    output: Annotated[Path, typer.Option("--output", "-o", help="where the output JSONL goes ('-': stdout)")],
    errors: Annotated[Path | None, typer.Option("--errors", help="where the error JSONL goes "
                                                "(written empty when no line failed)")] = None,
    base_url: BaseUrl = DEFAULT_BASE_URL,
    api_key: ApiKey = "none",
) -> None:
    """Download a finished batch's output file (and its error file)."""
    client = _client(base_url, api_key)
    with _server_errors():
        batch = client.batches.retrieve(batch_id)
        if batch.status not in FINAL:
            typer.echo(f"error: {summary(batch)}; not finished, no results yet "
                       f"(llmq batch status {batch_id} --wait)", err=True)
            raise typer.Exit(1)
        # The error file first: a batch whose every line failed has only that one.
        if errors is not None:
            if batch.error_file_id:
                n = _download(client, batch.error_file_id, errors)
                typer.echo(f"wrote {n} failed lines to {errors}", err=True)
            elif str(errors) != "-":
                errors.parent.mkdir(parents=True, exist_ok=True)
                errors.write_bytes(b"")
                typer.echo(f"no line failed; wrote an empty {errors}", err=True)
        if not batch.output_file_id:
            why = "; see --errors" if batch.error_file_id else ""
            typer.echo(f"error: {summary(batch)}; it has no output file{why}", err=True)
            raise typer.Exit(1)
        n = _download(client, batch.output_file_id, output)
        typer.echo(f"wrote {n} lines to {output}", err=True)
