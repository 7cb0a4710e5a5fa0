"""``llmq bench capacity``: where llmq's own per-token path saturates.

It starts Redis, K API processes and M synthetic workers
(``worker/engines/synthetic``: no weights, a set step time), drives N
closed-loop streams at them with ``bench/loadgen.py`` (its own process), and
reads each process's CPU time before and after from the processes
themselves. Then the floor (``bench/floor.py``, FastAPI + sse-starlette
streaming the same chunks from memory at the same pace) takes the same load
in the same run. It prints:

- end-to-end output tokens/s;
- TTFT and inter-token time p50/p99, llmq's and the floor's, and what llmq
  adds over the floor (the synthetic engine's own pace);
- CPU microseconds per streamed token for each process kind (API, worker,
  Redis, the load generator): a core divided by it is what one process of
  that kind can carry, on this machine and on bigger ones.

``--url`` measures a running stack instead (only the client's figures: its
processes are not this run's to read).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.procs import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
MODEL = "synthetic"


@dataclass(frozen=True)
class CapacityConfig:
    api_procs: int = 1
    workers: int = 1
    streams: int = 64
    seconds: float = 20.0
    max_tokens: int = 64
    step_ms: float = 20.0
    batch: int | None = None  # rows per synthetic worker; None: streams / workers, rounded up
    url: str | None = None  # a running stack: only the client's figures
    floor: bool = True
    floor_step_ms: float | None = None  # None: the synthetic step; 0: the floor streams each answer at once
    worker_args: tuple[str, ...] = ()  # more options for every worker, e.g. ("--stream-interval", "4")
    logs: Path | None = None


@dataclass
class Side:
    """One system under the load: the client's figures and CPU per kind."""

    name: str
    load: dict[str, Any]
    cpu_s: dict[str, float] = field(default_factory=dict)  # by process kind, over the run
    procs: dict[str, int] = field(default_factory=dict)  # processes of each kind

    def us_per_token(self, kind: str) -> float | None:
        tokens = self.load["output_tokens"]
        return None if kind not in self.cpu_s or not tokens else self.cpu_s[kind] / tokens * 1e6


class Procs:
    """Child processes by kind, with their logs; all stopped on exit."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.by_kind: dict[str, list[subprocess.Popen[bytes]]] = {}

    def start(self, kind: str, argv: list[str]) -> subprocess.Popen[bytes]:
        n = len(self.by_kind.get(kind, []))
        out = open(self.logs / f"{kind}-{n}.log", "ab")  # noqa: SIM115 (the child writes it until it stops)
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.by_kind.setdefault(kind, []).append(proc)
        return proc

    def cpu_s(self) -> dict[str, float]:
        """User + system seconds of each kind's processes (and their children) so far."""
        out: dict[str, float] = {}
        for kind, procs in self.by_kind.items():
            total = 0.0
            for proc in procs:
                p = psutil.Process(proc.pid)
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            out[kind] = total
        return out

    def stop(self) -> None:
        for kind in sorted(self.by_kind, key=lambda k: k == "redis"):  # Redis last
            for proc in self.by_kind[kind]:
                proc.send_signal(signal.SIGTERM)
        for procs in self.by_kind.values():
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@contextmanager
def llmq_stack(cfg: CapacityConfig, logs: Path) -> Iterator[tuple[list[str], Procs]]:
    redis_port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "LLMQ_MAX_QUEUE_DEPTH": str(max(1024, cfg.streams * 4))}
    procs = Procs(logs, env)
    try:
        procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"])
        urls = []
        for _ in range(cfg.api_procs):
            port = free_port()
            procs.start("api", [sys.executable, "-m", "cli.main", "api", "--port", str(port), "--log-level",
                                "warning"])
            urls.append(f"http://127.0.0.1:{port}")
        batch = cfg.batch or -(-cfg.streams // cfg.workers)
        for i in range(cfg.workers):
            procs.start("worker", [sys.executable, "-m", "cli.main", "worker", "--engine", "synthetic",
                                   "--model-name", MODEL, "--concurrency", str(batch), "--hostname",
                                   f"capacity-{i}@%h", "--synthetic-step-ms", str(cfg.step_ms),
                                   "--synthetic-prefill-us", "0",
                                   "--synthetic-output-tokens", str(cfg.max_tokens * 4), "--loglevel", "WARNING",
                                   *cfg.worker_args])

        def serving() -> bool:
            for url in urls:
                data = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
                if not any(m["id"] == MODEL and m.get("workers", 0) >= cfg.workers for m in data):
                    return False
            return True

        wait_until(serving, 120, f"{cfg.workers} synthetic worker(s) behind {cfg.api_procs} API process(es)", logs)
        yield urls, procs
    finally:
        procs.stop()


@contextmanager
def floor_server(cfg: CapacityConfig, logs: Path) -> Iterator[tuple[list[str], Procs]]:
    procs = Procs(logs, {**os.environ, "PYTHONUNBUFFERED": "1"})
    port = free_port()
    try:
        procs.start("api", [sys.executable, "-m", "bench.floor", "--port", str(port), "--step-ms",
                            str(cfg.step_ms if cfg.floor_step_ms is None else cfg.floor_step_ms)])
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/docs", timeout=2).status_code == 200, 60, "the floor", logs)
        yield [url], procs
    finally:
        procs.stop()


def drive(name: str, cfg: CapacityConfig, urls: list[str], procs: Procs | None, logs: Path) -> Side:
    """A short warm-up, then the measured load, as a process of its own."""
    out = logs / f"{name}-load.json"
    base = [sys.executable, "-m", "bench.loadgen", "--model", MODEL, "--max-tokens", str(cfg.max_tokens)]
    base += [arg for url in urls for arg in ("--url", url)]
    subprocess.run([*base, "--streams", str(min(cfg.streams, 8)), "--seconds", "1"], cwd=ROOT, check=True,
                   capture_output=True)
    before = procs.cpu_s() if procs else {}
    load = subprocess.Popen([*base, "--streams", str(cfg.streams), "--seconds", str(cfg.seconds), "--json",
                             str(out)], cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(load.pid, 0)  # its exact CPU time, read as it is reaped
    load.returncode = os.waitstatus_to_exitcode(status)
    load_cpu = usage.ru_utime + usage.ru_stime
    if load.returncode:
        raise RuntimeError(f"the load generator failed ({load.returncode}); logs in {logs}")
    after = procs.cpu_s() if procs else {}
    side = Side(name=name, load=json.loads(out.read_text()))
    side.cpu_s = {k: after[k] - before.get(k, 0.0) for k in after}
    side.cpu_s["loadgen"] = load_cpu
    side.procs = {k: len(v) for k, v in procs.by_kind.items()} if procs else {}
    return side


def run(cfg: CapacityConfig) -> list[Side]:
    logs = cfg.logs or Path(tempfile.mkdtemp(prefix="llmq-capacity-"))
    logs.mkdir(parents=True, exist_ok=True)
    sides = []
    if cfg.url is not None:
        sides.append(drive("llmq", cfg, [cfg.url.rstrip("/").removesuffix("/v1")], None, logs))
    else:
        with llmq_stack(cfg, logs) as (urls, procs):
            sides.append(drive("llmq", cfg, urls, procs, logs))
    if cfg.floor:
        with floor_server(cfg, logs) as (urls, procs):
            sides.append(drive("floor", cfg, urls, procs, logs))
    return sides


def report(cfg: CapacityConfig, sides: list[Side]) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f} ms"

    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} µs"

    table = Table(title=f"llmq bench capacity: {cfg.streams} streams, {cfg.max_tokens} tokens each, synthetic step "
                        f"{cfg.step_ms:g} ms, {cfg.api_procs} API process(es), {cfg.workers} worker(s)"
                        + (f" ({' '.join(cfg.worker_args)})" if cfg.worker_args else ""))
    table.add_column("")
    for side in sides:
        table.add_column(side.name, justify="right")
    if len(sides) == 2:
        table.add_column("llmq adds", justify="right")
    rows: list[tuple[str, str, bool]] = [("output tokens/s", "tokens_per_s", False), ("TTFT p50", "ttft_p50_s", True),
                                         ("TTFT p99", "ttft_p99_s", True), ("ITL p50", "itl_p50_s", True),
                                         ("ITL p99", "itl_p99_s", True)]
    for label, key, timed in rows:
        values = [s.load[key] for s in sides]
        cells = [ms(v) if timed else f"{v:.1f}" for v in values]
        if len(sides) == 2:
            a, b = values
            cells.append(ms(a - b) if timed and a is not None and b is not None else "")
        table.add_row(label, *cells)
    table.add_row("requests / errors", *[f"{s.load['requests']} / {s.load['errors']}" for s in sides],
                  *([""] if len(sides) == 2 else []))
    for kind in ("api", "worker", "redis", "loadgen"):
        cells = [us(s.us_per_token(kind)) for s in sides]
        if len(sides) == 2:
            a, b = (s.us_per_token(kind) for s in sides)
            cells.append(f"{a / b:.1f}x the floor" if kind == "api" and a and b else "")
        table.add_row(f"CPU per token: {kind}", *cells)
    Console().print(table)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "sides": [asdict(s) | {"us_per_token": {k: s.us_per_token(k) for k in s.cpu_s}} for s in sides]}
    api = sides[0].us_per_token("api")
    if api:
        print(f"one API core carries about {1e6 / api:,.0f} tokens/s at {api:.0f} µs a token")
    redis_us = sides[0].us_per_token("redis")
    if redis_us:
        print(f"one Redis core carries about {1e6 / redis_us:,.0f} tokens/s at {redis_us:.1f} µs a token")
    return result
