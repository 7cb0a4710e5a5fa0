"""Starting the real services for end-to-end tests: redis-server on a free
port, the API under uvicorn, Celery workers with the real model. Each one's
output goes to a log file under test-artifacts/ for post-mortems."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DEMO_MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
DEMO_MODEL = "smollm2-135m-instruct"
# logit_bias that bans the demo model's end tokens (<|im_end|>, <|endoftext|>): for
# answers that must still be running when a test acts, however fast the engine.
NO_END_BIAS = {"2": -100, "0": -100}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.popen.returncode}; log:\n{proc.tail()}")
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout_s} s" + (f"; log:\n{proc.tail()}" if proc else ""))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def spawn(name: str, argv: list[str], env: dict[str, str]) -> Proc:
    ARTIFACTS.mkdir(exist_ok=True)
    # The pid of the test session keeps logs of concurrent test runs apart.
    log = ARTIFACTS / f"{name}-{os.getpid()}.log"
    out = open(log, "wb")
    popen = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                             stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, popen, log)


def start_redis(tmp: Path, port: int | None = None) -> tuple[Proc, int]:
    port = port or free_port()
    proc = spawn(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                                   "--save", "", "--appendonly", "no"], {})

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    wait_for(up, 10, "redis-server", proc)
    return proc, port


def quick_env(redis_port: int, **more: str) -> dict[str, str]:
    """Settings for a test stack on ``redis_port`` whose registry follows a
    worker within a second: half-second heartbeats, a 2 s TTL, a 0.2 s cache."""
    return {"LLMQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LLMQ_HEARTBEAT_INTERVAL_S": "0.5",
            "LLMQ_HEARTBEAT_TTL_S": "2.0", "LLMQ_REGISTRY_CACHE_S": "0.2", **more}


def start_api(env: dict[str, str], name: str = "api", log_level: str = "warning") -> tuple[Proc, str]:
    port = free_port()
    proc = spawn(name, [sys.executable, "-m", "cli.main", "api", "--port", str(port), "--log-level", log_level], env)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{base}/health", timeout=1).status_code == 200, 30, name, proc)
    return proc, base


def start_worker(env: dict[str, str], name: str, model_names: str = DEMO_MODEL, extra: list[str] | None = None,
                 concurrency: int = 16) -> Proc:
    argv = [sys.executable, "-m", "cli.main", "worker", "--model-path", str(DEMO_MODEL_DIR),
            "--model-name", model_names, "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
            *(extra or [])]
    return spawn(name, argv, env)


def served_models(base: str) -> list[str]:
    """Models with a live worker (declared ones without one are listed with 0)."""
    return [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"] if m["workers"]]


def wait_model(base: str, model: str, proc: Proc, timeout_s: float = 120) -> None:
    wait_for(lambda: model in served_models(base), timeout_s, f"worker {proc.name} serving {model}", proc)
