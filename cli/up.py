"""``llmq up`` (what ``make run`` runs): the demo stack as child processes.

Redis, the API, a worker for the demo chat model, one for the embedding
model, and Flower, each started
the way an operator would start it, with the URLs printed once all are up.
Ctrl-C (or SIGTERM) stops them all, workers first so they withdraw cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from broker.settings import Settings
from cli.argv import worker_argv
from cli.demo_model import DEFAULT_DIR, DEMO_MODEL_NAME, EMBEDDING_MODEL_NAME, build, embedding_model_dir

console = Console()
VAR = Path("var")


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {VAR}/logs")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not open port {port} within {timeout_s:.0f} s")


def _wait_model(api_port: int, model: str, proc: subprocess.Popen[bytes], settings: Settings,
                timeout_s: float = 180) -> None:
    import httpx

    # The API child reads the same LLMQ_API_KEYS: any one of them is let in.
    headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {proc.returncode}; see {VAR}/logs/worker.log")
        try:
            ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{api_port}/v1/models", headers=headers).json()["data"]]
            if model in ids:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no worker registered {model} within {timeout_s:.0f} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_stack(settings: Settings, *, api_port: int, flower_port: int, redis_port: int) -> int:
    """``settings`` are this process's, from the environment the children
    inherit (with the Redis URL of the Redis started here)."""
    logs = VAR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (VAR / "redis").mkdir(parents=True, exist_ok=True)
    model_dir = build(DEFAULT_DIR)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, "LLMQ_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, proc))
        return proc

    def stop_all(*_: object) -> None:
        for name, proc in reversed(procs):  # flower, worker, api, redis
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        procs.clear()

    # Ctrl-C and SIGTERM both stop the stack; SIGINT is set explicitly because
    # a shell that starts us in the background leaves it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", redis_port)) == 0:
                raise RuntimeError(f"port {redis_port} is taken; is another Redis running? (--redis-port)")
        redis = spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                "--dir", str(VAR / "redis"), "--save", "", "--appendonly", "no"])
        _wait_port(redis_port, redis, "redis-server")
        api = spawn("api", [sys.executable, "-m", "cli.main", "api", "--port", str(api_port)])
        _wait_port(api_port, api, "the API")
        worker = spawn("worker", worker_argv([str(model_dir)], [DEMO_MODEL_NAME], 16, [], settings=settings))
        embedder = spawn("worker-embeddings", worker_argv([str(embedding_model_dir())], [EMBEDDING_MODEL_NAME], 4, [],
                                                          settings=settings))
        spawn("flower", [sys.executable, "-m", "celery", "--broker", redis_url, "flower",
                         f"--port={flower_port}", "--address=127.0.0.1"])
        _wait_model(api_port, DEMO_MODEL_NAME, worker, settings)
        _wait_model(api_port, EMBEDDING_MODEL_NAME, embedder, settings)
        console.print(f"""
[bold green]llmq is up[/]
  Web chat                 http://127.0.0.1:{api_port}/
  API (OpenAI-compatible)  http://127.0.0.1:{api_port}/v1
  API docs                 http://127.0.0.1:{api_port}/docs
  Flower (queues, tasks)   http://127.0.0.1:{flower_port}
  Redis                    {redis_url}
  models                   {DEMO_MODEL_NAME} (chat), {EMBEDDING_MODEL_NAME} (embeddings)
  logs                     {logs}/
Try:  curl http://127.0.0.1:{api_port}/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{{"model": "{DEMO_MODEL_NAME}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
Ctrl-C stops everything.""", soft_wrap=True)
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}; see {logs}/{name}.log")
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("\nstopping...")
        return 0
    except RuntimeError as exc:
        console.print(f"[bold red]llmq up failed:[/] {exc}")
        return 1
    finally:
        stop_all()
