"""The soak: minutes of mixed load on a stack this script starts (Redis, the
API, two workers of the demo model), with one worker restarted halfway.

Each client loops over a mix: streamed and whole chat answers, ``n`` = 3,
text completions, streams it hangs up on after a few chunks, and bad
requests. Every ``sample_s`` it records the API's and the workers' resident
memory and the Redis key count; at the end it prints them over time, every
status seen, and the jobs lost: requests that got no answer at all (no
status, a body that is not an answer, a stream that stopped without its end
or an error event). It fails (exit 1) on a lost job, on a per-job key
without a TTL, or on a key count still growing after the warm-up.

Per-job keys live at most ``key_ttl_s`` here (cancel marks, claims after
their job; ``LLMQ_CANCEL_TTL_S`` and friends, much shorter than the
defaults) so that the count must level off within the run: warm-up is two
such TTLs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.procs import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
DEMO_DIR = ROOT / "models" / MODEL


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 20.0
    clients: int = 8
    sample_s: float = 10.0
    key_ttl_s: int = 60
    seed: int = 0


@dataclass
class Sample:
    t: float
    api_mb: float
    worker_mb: list[float]
    redis_keys: int
    requests: int


@dataclass
class Soak:
    cfg: SoakConfig
    outcomes: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "lost":
                self.lost.append(detail)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Stack:
    def __init__(self, cfg: SoakConfig, logs: Path) -> None:
        self.logs = logs
        self.redis_port, self.api_port = free_port(), free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMQ_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                    "LLMQ_CANCEL_TTL_S": str(cfg.key_ttl_s), "LLMQ_JOB_KEY_LINGER_S": str(cfg.key_ttl_s // 2),
                    "LLMQ_FIRST_EVENT_TIMEOUT_S": str(max(cfg.key_ttl_s - 5, 10))}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.start("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(logs)])
        self.start("api", [sys.executable, "-m", "cli.main", "api", "--port", str(self.api_port),
                           "--log-level", "warning"])
        for name in ("worker-1", "worker-2"):
            self.start_worker(name)
        self.redis = redis.Redis(port=self.redis_port)
        self.wait_workers(2)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=out,
                                            stderr=subprocess.STDOUT)

    def start_worker(self, name: str) -> None:
        # Two workers share the machine's cores: each takes its share of torch
        # threads, or their OpenMP teams fight over every core.
        share = str(max(1, (os.cpu_count() or 2) // 2))
        self.start(name, [sys.executable, "-m", "cli.main", "worker", "--model-path", str(DEMO_DIR), "--model-name",
                          MODEL, "--concurrency", "8", "--hostname", f"soak-{name}@%h"], {"OMP_NUM_THREADS": share})

    def wait_workers(self, n: int, timeout_s: float = 300) -> None:
        def serving() -> bool:
            data = httpx.get(f"{self.base}/v1/models", timeout=2).json()["data"]
            return any(m["id"] == MODEL and m["workers"] >= n for m in data)

        wait_until(serving, timeout_s, f"{n} workers serving {MODEL}", self.logs)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def restart_worker(self, name: str) -> None:
        """A warm restart: SIGTERM (running jobs finish), then a new process."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        self.start_worker(name)

    def worker_pids(self) -> list[int]:
        return [p.pid for n, p in sorted(self.procs.items()) if n.startswith("worker")]

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "redis"):  # Redis last
            proc = self.procs[name]
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def keys_without_ttl(self) -> list[str]:
        """Per-job keys (jobs, rate-limit windows) that would live forever."""
        bad = []
        for pattern in ("llmq:job:*", "llmq:ratelimit:*"):
            for key in self.redis.scan_iter(match=pattern, count=1000):
                if self.redis.ttl(key) == -1:
                    bad.append(key.decode())
        return bad


# ------------------------------------------------------------------- the load


def _one(http: httpx.Client, base: str, rng: random.Random, soak: Soak) -> None:
    kind = rng.choices(["stream", "whole", "n3", "completion", "hangup", "bad"], [35, 25, 10, 10, 10, 10])[0]
    messages = [{"role": "user", "content": f"Tell me about the number {rng.randint(1, 10**6)}."}]
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": rng.randint(8, 32),
                            "temperature": rng.choice([0, 0.7])}
    url = f"{base}/v1/chat/completions"
    if kind == "n3":
        body |= {"n": 3, "max_tokens": 8}
    elif kind == "completion":
        url = f"{base}/v1/completions"
        body = {"model": MODEL, "prompt": messages[0]["content"], "max_tokens": body["max_tokens"]}
    elif kind == "bad":
        body["temperature"] = 5
    try:
        if kind in ("stream", "hangup"):
            _stream(http, url, {**body, "stream": True}, kind == "hangup", soak)
            return
        r = http.post(url, json=body)
        if r.status_code == 200:
            data = r.json()
            want = body.get("n", 1)
            if len(data.get("choices", [])) != want or any(c.get("finish_reason") is None for c in data["choices"]):
                soak.record("lost", f"{kind}: 200 without {want} finished choices")
                return
        soak.record(f"{kind} {r.status_code}")
    except (httpx.HTTPError, ValueError) as exc:
        soak.record("lost", f"{kind}: {type(exc).__name__}: {exc}")


def _stream(http: httpx.Client, url: str, body: dict[str, Any], hang_up: bool, soak: Soak) -> None:
    with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            soak.record(f"stream {r.status_code}")
            return
        chunks, done, error = 0, False, False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunks += 1
            if '"error"' in data and "error" in json.loads(data):
                error = True
            if hang_up and chunks >= 3:
                soak.record("hung up")  # closing the connection mid-stream
                return
        if done:
            soak.record("stream 200+error event" if error else "stream 200")
        else:
            soak.record("lost", f"stream ended after {chunks} chunks without [DONE]")


def run(cfg: SoakConfig) -> tuple[Soak, bool]:
    logs = Path(tempfile.mkdtemp(prefix="llmq-soak-"))
    print(f"starting the stack (logs in {logs})", flush=True)
    stack = Stack(cfg, logs)
    soak = Soak(cfg)
    stop = threading.Event()
    t0 = time.monotonic()
    end = t0 + cfg.minutes * 60

    def client(i: int) -> None:
        rng = random.Random(cfg.seed * 1000 + i)
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                _one(http, stack.base, rng, soak)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(cfg.clients)]
    for t in threads:
        t.start()
    restarted = False
    try:
        while time.monotonic() < end:
            time.sleep(cfg.sample_s)
            soak.samples.append(Sample(
                t=time.monotonic() - t0, api_mb=_rss_mb(stack.procs["api"].pid),
                worker_mb=[_rss_mb(p) for p in stack.worker_pids()], redis_keys=int(stack.redis.dbsize()),
                requests=sum(soak.outcomes.values())))
            s = soak.samples[-1]
            print(f"t={s.t:6.0f}s api {s.api_mb:6.1f} MB  workers {' '.join(f'{m:6.1f}' for m in s.worker_mb)} MB  "
                  f"redis keys {s.redis_keys:5d}  requests {s.requests}", flush=True)
            if not restarted and time.monotonic() - t0 > cfg.minutes * 30:
                print("restarting worker-1 (SIGTERM, then a new process)", flush=True)
                stack.restart_worker("worker-1")
                restarted = True
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
        hung = sum(t.is_alive() for t in threads)
        without_ttl = stack.keys_without_ttl()
        stack.stop()
    ok = report(soak, hung, without_ttl)
    return soak, ok


def report(soak: Soak, hung_clients: int, without_ttl: list[str]) -> bool:
    cfg = soak.cfg
    print("\nstatus codes seen:")
    for outcome, n in sorted(soak.outcomes.items()):
        print(f"  {outcome:28s} {n}")
    print(f"jobs lost: {len(soak.lost) + hung_clients}" + (f" ({soak.lost[:5]})" if soak.lost else ""))
    print(f"per-job keys without a TTL: {len(without_ttl)} {without_ttl[:5]}")
    warm = [s for s in soak.samples if s.t >= 2 * cfg.key_ttl_s]
    flat = True
    if len(warm) >= 2:
        first, last, peak = warm[0].redis_keys, warm[-1].redis_keys, max(s.redis_keys for s in warm)
        flat = last <= first * 1.3 + 20
        print(f"redis keys after the warm-up ({2 * cfg.key_ttl_s} s): first {first}, last {last}, peak {peak}: "
              f"{'flat' if flat else 'STILL GROWING'}")
        api = [s.api_mb for s in warm]
        print(f"API memory after the warm-up: {api[0]:.1f} -> {api[-1]:.1f} MB (peak {max(api):.1f})")
    else:
        print("too short a run to judge the key count after the warm-up")
    return not soak.lost and not hung_clients and not without_ttl and flat and len(warm) >= 2
