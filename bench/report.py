"""Printing figures as a rich table, one column per run, and writing them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stats import Figures


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.1f} ms"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


ROWS: list[tuple[str, Any]] = [
    ("output tokens/s", lambda f: _num(f.tokens_per_s, ".2f")),
    ("requests/s", lambda f: _num(f.requests_per_s, ".3f")),
    ("TTFT p50", lambda f: _ms(f.ttft_p50_s)),
    ("TTFT p99", lambda f: _ms(f.ttft_p99_s)),
    ("ITL p50 (per token)", lambda f: _ms(f.itl_p50_s)),
    ("errors", lambda f: str(f.errors) + (f" {f.error_kinds}" if f.error_kinds else "")),
    ("wall time", lambda f: f"{f.wall_s:.2f} s"),
    ("requests ok / sent", lambda f: f"{f.ok} / {f.requests}"),
    ("concurrency", lambda f: str(f.concurrency)),
    ("output tokens (sum)", lambda f: str(f.output_tokens)),
    ("mean output tokens", lambda f: _num(f.mean_output_tokens)),
    ("stopped at max_tokens", lambda f: f"{f.hit_max_tokens} (max_tokens={f.max_tokens})"),
    ("mean prompt tokens", lambda f: _num(f.mean_prompt_tokens)),
]


def ratio(http: Figures, baseline: Figures) -> float | None:
    return http.tokens_per_s / baseline.tokens_per_s if baseline.tokens_per_s > 0 else None


def render(runs: list[Figures], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="llmq benchmark")
    table.add_column("metric")
    for f in runs:
        table.add_column(f.name, justify="right")
    for label, cell in ROWS:
        table.add_row(label, *(cell(f) for f in runs))
    console.print(table)
    by_name = {f.name: f for f in runs}
    if "http" in by_name and "baseline" in by_name:
        r = ratio(by_name["http"], by_name["baseline"])
        console.print(
            f"[bold]output tokens/s http / baseline: {_num(r, '.2f')}x[/bold]   "
            f"http TTFT p50: {_ms(by_name['http'].ttft_p50_s)}"
        )


def write_json(path: Path, runs: list[Figures], meta: dict[str, Any]) -> None:
    doc: dict[str, Any] = {"meta": meta, "runs": {f.name: f.to_dict() for f in runs}}
    by_name = {f.name: f for f in runs}
    if "http" in by_name and "baseline" in by_name:
        doc["tokens_per_s_ratio"] = ratio(by_name["http"], by_name["baseline"])
        doc["http_ttft_p50_s"] = by_name["http"].ttft_p50_s
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
