"""``llmq bench fairness``: does a key with few clients keep its share beside
a key that floods the same model?

It starts Redis, one synthetic worker (``--threads`` rows, a set step time)
and two API processes on them: one with fair share between keys (llmq's
default, ``broker/fairness.py``) and one first come, first served
(``LLMQ_FAIR_SHARE=false``), so both policies meet the same worker in one
run. Key A runs ``--a-streams`` closed-loop streams of long answers, key B
``--b-streams`` of short ones (``bench/loadgen.py``, a process each). Four
phases, each ``--seconds`` long: B alone, A alone, then A and B together
through the fair API, then through the first-come API. It prints, for each
policy:

- B's time to first token p50 with A beside it, against B's alone;
- B's output tokens/s against its weighted fair share: the smaller of what
  B takes alone (its clients' own demand) and its weight's part of the
  total (max-min fairness);
- the total tokens/s (A and B) against A's alone: what fairness costs the
  worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.capacity import ROOT, Procs
from bench.procs import free_port, wait_until

MODEL = "synthetic"
KEY_A, KEY_B = "sk-bench-tenant-a", "sk-bench-tenant-b"  # named key-1 and key-2, weight 1 each


@dataclass(frozen=True)
class FairnessConfig:
    a_streams: int = 32
    b_streams: int = 2
    threads: int = 16
    a_tokens: int = 256  # key A asks for long answers
    b_tokens: int = 32  # key B for short ones
    spread: float = 0.5  # each answer asks for tokens x (1 +- spread): clients that end apart, as real ones do
    step_ms: float = 20.0
    seconds: float = 30.0
    logs: Path | None = None


@contextmanager
def stack(cfg: FairnessConfig, logs: Path) -> Iterator[dict[str, str]]:
    """Redis, one worker, and two API processes: {"fair": url, "fcfs": url}."""
    redis_port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "LLMQ_API_KEYS": f"{KEY_A},{KEY_B}", "LLMQ_MAX_QUEUE_DEPTH": "1024"}
    procs = Procs(logs, env)
    try:
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"])
        urls = {}
        for policy, fair in (("fair", "true"), ("fcfs", "false")):
            port = free_port()
            procs.env = {**env, "LLMQ_FAIR_SHARE": fair}
            procs.start("api", [sys.executable, "-m", "cli.main", "api", "--port", str(port), "--log-level",
                                "warning"])
            urls[policy] = f"http://127.0.0.1:{port}"
        procs.env = env
        procs.start("worker", [sys.executable, "-m", "cli.main", "worker", "--engine", "synthetic", "--model-name",
                               MODEL, "--concurrency", str(cfg.threads), "--hostname", "fairness@%h",
                               "--synthetic-step-ms", str(cfg.step_ms),
                               "--synthetic-output-tokens", str(max(cfg.a_tokens, cfg.b_tokens) * 4),
                               "--loglevel", "WARNING"])

        def serving() -> bool:
            headers = {"Authorization": f"Bearer {KEY_A}"}
            return all(any(m["id"] == MODEL and m["workers"] for m in httpx.get(
                f"{u}/v1/models", headers=headers, timeout=2).json()["data"]) for u in urls.values())

        wait_until(serving, 120, "the synthetic worker behind both API processes", logs)
        yield urls
    finally:
        procs.stop()


def load(url: str, key: str, streams: int, tokens: int, cfg: FairnessConfig, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen", "--url", url, "--model", MODEL, "--streams",
                             str(streams), "--max-tokens", str(tokens), "--max-tokens-spread", str(cfg.spread),
                             "--seconds", str(cfg.seconds), "--api-key", key, "--json", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL)


def phase(name: str, url: str, cfg: FairnessConfig, logs: Path, a: bool, b: bool) -> dict[str, Any]:
    runs = {}
    if a:
        runs["a"] = load(url, KEY_A, cfg.a_streams, cfg.a_tokens, cfg, logs / f"{name}-a.json")
    if b:
        runs["b"] = load(url, KEY_B, cfg.b_streams, cfg.b_tokens, cfg, logs / f"{name}-b.json")
    out = {}
    for who, proc in runs.items():
        if proc.wait():
            raise RuntimeError(f"{name}: the load generator of key {who.upper()} failed; logs in {logs}")
        out[who] = json.loads((logs / f"{name}-{who}.json").read_text())
    return out


def run(cfg: FairnessConfig) -> dict[str, Any]:
    logs = cfg.logs or Path(tempfile.mkdtemp(prefix="llmq-fairness-"))
    logs.mkdir(parents=True, exist_ok=True)
    with stack(cfg, logs) as urls:
        # A warm-up through each API: the worker's and the APIs' first requests are slow.
        for u in urls.values():
            phase("warmup", u, FairnessConfig(a_streams=4, b_streams=1, seconds=2), logs, a=True, b=True)
        phases = {
            "b_alone": phase("b_alone", urls["fair"], cfg, logs, a=False, b=True),
            "a_alone": phase("a_alone", urls["fair"], cfg, logs, a=True, b=False),
            "fair": phase("fair", urls["fair"], cfg, logs, a=True, b=True),
            "fcfs": phase("fcfs", urls["fcfs"], cfg, logs, a=True, b=True),
        }
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "phases": phases,
            "policies": {p: judge(phases, p) for p in ("fair", "fcfs")}}


def judge(phases: dict[str, Any], policy: str) -> dict[str, float | None]:
    """The three figures of the issue for one policy, from the phases' loads."""
    b_alone, a_alone, both = phases["b_alone"]["b"], phases["a_alone"]["a"], phases[policy]
    total = both["a"]["tokens_per_s"] + both["b"]["tokens_per_s"]
    fair_share = min(b_alone["tokens_per_s"], total / 2)  # equal weights
    ttft_alone, ttft = b_alone["ttft_p50_s"], both["b"]["ttft_p50_s"]
    return {
        "b_ttft_p50_s": ttft, "b_ttft_p50_alone_s": ttft_alone,
        "b_ttft_ratio": ttft / ttft_alone if ttft and ttft_alone else None,
        "b_tokens_per_s": both["b"]["tokens_per_s"], "b_fair_share_tokens_per_s": fair_share,
        "b_share_ratio": both["b"]["tokens_per_s"] / fair_share if fair_share else None,
        "a_tokens_per_s": both["a"]["tokens_per_s"], "a_alone_tokens_per_s": a_alone["tokens_per_s"],
        "total_tokens_per_s": total,
        "throughput_ratio": total / a_alone["tokens_per_s"] if a_alone["tokens_per_s"] else None,
        "a_ratio": both["a"]["tokens_per_s"] / a_alone["tokens_per_s"] if a_alone["tokens_per_s"] else None,
        "errors": sum(both[w]["errors"] for w in ("a", "b")),
    }


def report(cfg: FairnessConfig, result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f} ms"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    pol = result["policies"]
    table = Table(title=f"llmq bench fairness: key A {cfg.a_streams} streams x {cfg.a_tokens} tokens, key B "
                        f"{cfg.b_streams} x {cfg.b_tokens} (each +-{cfg.spread:.0%}), one synthetic worker of {cfg.threads} threads, step "
                        f"{cfg.step_ms:g} ms, {cfg.seconds:g} s a phase")
    table.add_column("")
    table.add_column("fair share", justify="right")
    table.add_column("first come, first served", justify="right")
    table.add_column("target (fair)", justify="right")
    rows = [
        ("B's TTFT p50 with A (alone)", lambda p: f"{ms(p['b_ttft_p50_s'])} ({ms(p['b_ttft_p50_alone_s'])})", ""),
        ("  ratio to alone", lambda p: x(p["b_ttft_ratio"]), "<= 1.5x"),
        ("B's tokens/s (its fair share)", lambda p: f"{p['b_tokens_per_s']:.1f} ({p['b_fair_share_tokens_per_s']:.1f})",
         ""),
        ("  ratio to its fair share", lambda p: x(p["b_share_ratio"]), ">= 0.9x"),
        ("A's tokens/s (alone)", lambda p: f"{p['a_tokens_per_s']:.1f} ({p['a_alone_tokens_per_s']:.1f})", ""),
        ("total tokens/s, ratio to A alone", lambda p: f"{p['total_tokens_per_s']:.1f}, {x(p['throughput_ratio'])}",
         ">= 0.9x"),
        ("errors", lambda p: str(p["errors"]), "0"),
    ]
    for label, cell, target in rows:
        table.add_row(label, cell(pol["fair"]), cell(pol["fcfs"]), target)
    Console().print(table)
