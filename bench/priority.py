"""Interactive clients beside a running batch: does the batch stay out of their way?

Three phases against a running stack:

1. idle: ``concurrency`` streaming chat clients in a closed loop (as ``bench
   http``) on an idle worker: TTFT p50/p99 and output tokens/s;
2. with batch: a batch of ``batch_lines`` short chat lines is submitted through
   the Files and Batches APIs; once it is ``in_progress`` and its first lines
   are done (the worker is busy with batch work), the same interactive run
   again, and the batch's lines/s meanwhile, from its ``request_counts``;
3. alone: the batch's lines/s with no interactive load, for ``alone_s``; then
   the batch is cancelled (unless ``keep_batch``).

The goal it measures: TTFT p50 with the batch at most 1.5x idle, while the
batch still uses the slots interactive work leaves. It prints figures and
asserts nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bench.http import HttpConfig, run_async
from bench.stats import Figures

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import Batch

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})  # OpenAI's final batch statuses
BUSY_LINES = 16  # lines done before the with-batch phase starts: the batch has reached the worker
START_TIMEOUT_S = 600.0  # for the batch to validate and get its first lines done
POLL_S = 0.5
GOAL_RATIO = 1.5  # the bound on TTFT p50 with the batch / idle
BATCH_PROMPTS = ("Name a colour.", "Say a number.", "Name an animal.", "Write one word.", "Name a city.")


@dataclass(frozen=True, kw_only=True)
class PriorityConfig:
    base_url: str
    model: str
    prompt: str
    api_key: str | None = None
    concurrency: int = 16
    requests: int = 96
    max_tokens: int = 32
    temperature: float = 0.7
    unique_prompts: bool = False
    service_tier: str | None = None  # the interactive clients' service_tier; None: not sent
    batch_lines: int = 2000
    batch_max_tokens: int = 32
    alone_s: float = 20.0
    keep_batch: bool = False


@dataclass(frozen=True)
class Sample:
    """One look at the batch: when (perf_counter), and its counts then."""

    t: float
    completed: int
    failed: int
    total: int
    status: str

    @classmethod
    def of(cls, batch: Batch, t: float) -> Sample:
        c = batch.request_counts
        return cls(t, c.completed if c else 0, c.failed if c else 0, c.total if c else 0, batch.status)

    @property
    def done(self) -> int:
        return self.completed + self.failed


@dataclass(frozen=True)
class BatchRate:
    """The batch's progress between two samples."""

    seconds: float
    completed: int  # lines that completed in between
    failed: int
    lines_per_s: float | None  # completed lines only: a failed line is no work done
    ended: bool  # the batch reached a final state or ran out of lines: the rate is a lower bound


def batch_rate(a: Sample, b: Sample) -> BatchRate:
    seconds = b.t - a.t
    completed = b.completed - a.completed
    ended = b.status in FINAL or (b.total > 0 and b.done >= b.total)
    return BatchRate(seconds=seconds, completed=completed, failed=b.failed - a.failed,
                     lines_per_s=completed / seconds if seconds > 0 else None, ended=ended)


def ttft_ratio(with_batch: Figures, idle: Figures) -> float | None:
    """TTFT p50 with the batch over idle; None where either is missing."""
    if with_batch.ttft_p50_s is None or not idle.ttft_p50_s:
        return None
    return with_batch.ttft_p50_s / idle.ttft_p50_s


def batch_jsonl(model: str, lines: int, max_tokens: int) -> bytes:
    """The batch's input file: short chat lines, each with its own custom_id."""
    out = io.StringIO()
    for i in range(lines):
        body = {"model": model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": f"{i}. {BATCH_PROMPTS[i % len(BATCH_PROMPTS)]}"}]}
        out.write(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                              "body": body}) + "\n")
    return out.getvalue().encode()


# -- the interactive clients ---------------------------------------------------

def interactive(cfg: PriorityConfig, label: str) -> Figures:
    """``bench http``'s closed loop of streaming clients, with the run's ``service_tier``."""
    return asyncio.run(run_async(HttpConfig(
        base_url=cfg.base_url, model=cfg.model, prompt=cfg.prompt, concurrency=cfg.concurrency,
        requests=cfg.requests, max_tokens=cfg.max_tokens, temperature=cfg.temperature, api_key=cfg.api_key,
        unique_prompts=cfg.unique_prompts, service_tier=cfg.service_tier, label=label)))


# -- the batch -------------------------------------------------------------------

def _look(client: OpenAI, batch_id: str) -> Sample:
    batch = client.batches.retrieve(batch_id)
    return Sample.of(batch, time.perf_counter())


def submit_batch(client: OpenAI, cfg: PriorityConfig) -> str:
    data = batch_jsonl(cfg.model, cfg.batch_lines, cfg.batch_max_tokens)
    uploaded = client.files.create(file=("bench-priority.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"bench": "priority"})
    return batch.id


def wait_busy(client: OpenAI, batch_id: str) -> Sample:
    """Until the batch runs and has lines done, so the worker is busy with it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        s = _look(client, batch_id)
        if s.status in FINAL:
            raise RuntimeError(f"batch {batch_id} ended ({s.status}) before the with-batch phase could start")
        if s.status == "in_progress" and s.done >= min(BUSY_LINES, max(s.total - 1, 1)):
            return s
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {batch_id} not busy after {START_TIMEOUT_S:.0f} s: {s}")
        time.sleep(POLL_S)


def watch_alone(client: OpenAI, batch_id: str, start: Sample, seconds: float) -> Sample:
    """Sample until ``seconds`` have passed or the batch ends; the last sample."""
    last = start
    while last.t - start.t < seconds and last.status not in FINAL:
        time.sleep(min(1.0, max(0.0, seconds - (last.t - start.t))))
        last = _look(client, batch_id)
    return last


# -- the run -----------------------------------------------------------------------

def run(cfg: PriorityConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.api_key or "none", max_retries=2)
    log(f"idle: {cfg.requests} requests, {cfg.concurrency} clients")
    idle = interactive(cfg, "idle")
    batch_id = submit_batch(client, cfg)
    log(f"batch {batch_id}: {cfg.batch_lines} lines submitted; waiting for its first {BUSY_LINES} to be done")
    try:
        before = wait_busy(client, batch_id)
        log(f"with batch: {before.done} of {before.total} lines done; the same interactive run")
        busy = interactive(cfg, "with batch")
        after = _look(client, batch_id)
        during = batch_rate(before, after)
        log(f"alone: the batch with no interactive load for {cfg.alone_s:.0f} s")
        end = watch_alone(client, batch_id, after, cfg.alone_s)
        alone = batch_rate(after, end)
    finally:
        if not cfg.keep_batch:
            try:
                client.batches.cancel(batch_id)
                log(f"batch {batch_id} cancelled")
            except openai.APIError as exc:  # an ended batch refuses cancel; the figures still print
                log(f"batch {batch_id} not cancelled: {exc}")
    return {
        "config": asdict(cfg),
        "batch_id": batch_id,
        "idle": idle.to_dict(),
        "with_batch": busy.to_dict(),
        "ttft_p50_ratio": ttft_ratio(busy, idle),
        "goal_ratio": GOAL_RATIO,
        "batch_during": asdict(during),
        "batch_alone": asdict(alone),
    }


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v * 1000:.1f} ms"

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(v, fmt)

    idle, busy = result["idle"], result["with_batch"]
    during, alone = result["batch_during"], result["batch_alone"]
    tier = result["config"]["service_tier"] or "unset"
    table = Table(title=f"llmq: interactive clients beside a batch (service_tier {tier})")
    table.add_column("metric")
    table.add_column("idle", justify="right")
    table.add_column("with batch", justify="right")
    table.add_column("batch alone", justify="right")
    table.add_row("TTFT p50", ms(idle["ttft_p50_s"]), ms(busy["ttft_p50_s"]), "")
    table.add_row("TTFT p99", ms(idle["ttft_p99_s"]), ms(busy["ttft_p99_s"]), "")
    table.add_row("output tokens/s", num(idle["tokens_per_s"]), num(busy["tokens_per_s"]), "")
    table.add_row("requests ok / sent", f"{idle['ok']} / {idle['requests']}", f"{busy['ok']} / {busy['requests']}", "")
    table.add_row("wall time", f"{idle['wall_s']:.2f} s", f"{busy['wall_s']:.2f} s", f"{alone['seconds']:.2f} s")
    table.add_row("batch lines/s", "", num(during["lines_per_s"]), num(alone["lines_per_s"]))
    console = Console()
    console.print(table)
    console.print(f"[bold]TTFT p50 with batch / idle: {num(result['ttft_p50_ratio'])}x[/bold] "
                  f"(goal at most {result['goal_ratio']}x); batch {result['batch_id']}: "
                  f"{during['completed']} lines done beside the clients, {alone['completed']} alone")
    for name, rate in (("beside the clients", during), ("alone", alone)):
        if rate["failed"]:
            console.print(f"[yellow]{rate['failed']} batch lines failed {name}[/yellow]")
    if during["ended"]:
        console.print("[yellow]the batch ended during the with-batch run: part of that run saw an idle worker; "
                      "use more --batch-lines[/yellow]")
    elif alone["ended"]:
        console.print("[yellow]the batch ended during the alone phase: its lines/s alone is a lower bound[/yellow]")
