"""The engine's step, profiled: ``llmq bench profile``.

Loads the model as a worker does and runs the real engine in this process,
with its events published to a real Redis (a ``redis-server`` this command
starts on a free port, unless ``--redis-url`` names one) and read back by a
subscriber, as the API would. ``batch`` clients each keep one chat request
running (the next one starts when the last ends, so prefill of new
requests interleaves with decoding as under real load). After a warm-up it
prints where a step's time goes: scheduling, forward, sampling, the
engine's bookkeeping after it, and the pump thread's detokenize+publish
(which overlaps the next step), and how long the engine sat idle.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from broker.keys import Keys
from broker.schemas import Job, Message, Sampling, parse_message

PHASE_HELP = {
    "schedule": "pick rows and prompt chunks, build the step's layout",
    "forward": "the model's forward pass (attention over the paged cache included)",
    "sample": "token choice for the whole batch",
    "update": "bookkeeping: advance sequences, file prefix blocks, finish",
    "publish": "pump thread: detokenize, stop strings, one Redis pipeline (overlaps the next step)",
    "idle": "engine waiting for work",
}


@dataclass(frozen=True)
class ProfileConfig:
    model_path: str
    batch: int = 16
    seconds: float = 20.0
    warmup_s: float = 5.0
    max_tokens: int = 64
    prompt: str = "Write a long story about a lighthouse keeper."
    temperature: float = 0.0
    max_step_tokens: int | None = None
    prefix_caching: bool = True
    unique_prompts: bool = False  # as ``bench http --unique-prompts``
    redis_url: str | None = None


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not on PATH; install it or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(cfg: ProfileConfig) -> dict[str, Any]:
    import redis

    from worker.engines.transformers import MAX_STEP_TOKENS, TransformersOptions
    from worker.engines.transformers.detok import IncrementalDetokenizer
    from worker.engines.transformers.engine import Engine
    from worker.engines.transformers.runs import Run
    from worker.engines.transformers.threads import engine_threads
    from worker.loading import ModelSpec
    from worker.prompts import prompt_ids
    from worker.publish import Publisher

    threads = engine_threads()
    with redis_server(cfg.redis_url) as url:
        r = redis.Redis.from_url(url)
        channel = Keys().reply_channel("bench-profile")  # as an API process's, so Redis sees the same traffic
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel)
        stop = threading.Event()
        received = [0]

        def drain() -> None:  # the API's part: read every event
            while not stop.is_set():
                msg = pubsub.get_message(timeout=0.2)
                if msg is not None:
                    received[0] += len(parse_message(msg["data"]))

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        engine = Engine(ModelSpec(path=cfg.model_path), TransformersOptions(
            max_batch_size=cfg.batch, kv_cache_tokens=cfg.batch * 2048, threads=threads,
            max_step_tokens=cfg.max_step_tokens or MAX_STEP_TOKENS, prefix_caching=cfg.prefix_caching), Publisher(r))
        lm = engine.lm
        engine.start()
        counter = iter(range(10**9))

        def client() -> None:
            while not stop.is_set():
                number = next(counter)
                prompt = f"Request {number}. {cfg.prompt}" if cfg.unique_prompts else cfg.prompt
                job = Job(job_id=f"profile-{number}", model=lm.names[0], kind="chat", reply_channel=channel,
                          submitted_at=time.time(), messages=[Message(role="user", content=prompt)],
                          sampling=Sampling(temperature=cfg.temperature, max_tokens=cfg.max_tokens))
                ids = prompt_ids(lm.tokenizer, job, lm.vocab_size)
                run_ = Run(job=job, index=0, prompt_ids=ids, max_tokens=cfg.max_tokens, queue_s=0.0,
                           detok=IncrementalDetokenizer(lm.tokenizer, ids))
                engine.add(run_)
                run_.ended.wait()

        clients = [threading.Thread(target=client, daemon=True) for _ in range(cfg.batch)]
        for c in clients:
            c.start()
        time.sleep(cfg.warmup_s)
        engine.profile.snapshot(reset=True)
        t0 = time.monotonic()
        time.sleep(cfg.seconds)
        totals = engine.profile.snapshot()
        wall = time.monotonic() - t0
        stop.set()
        engine.stop()
        for c in clients:  # none may outlive this call (see Engine.stop)
            c.join(timeout=5)
        reader.join(timeout=2)
        pubsub.close()
    per_step = totals.per_step_ms()
    busy = sum(v for k, v in per_step.items() if k not in ("publish", "idle"))
    return {
        "batch": cfg.batch, "seconds": wall, "steps": totals.steps, "steps_per_s": totals.steps / wall,
        "mean_decode_rows": totals.decode_rows / max(totals.steps, 1),
        "prefill_tokens_per_step": totals.prefill_tokens / max(totals.steps, 1),
        "cached_prompt_tokens": totals.cached_tokens, "output_tokens_per_s": totals.sampled / wall,
        "step_ms": busy, "phases_ms": per_step, "events_received": received[0],
        "threads": threads, "max_step_tokens": engine.max_step_tokens, "prefix_caching": cfg.prefix_caching,
    }


def render(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"engine step at batch {result['batch']} ({result['steps']} steps in "
                        f"{result['seconds']:.1f} s, {result['threads']} torch threads)")
    table.add_column("phase")
    table.add_column("ms / step", justify="right")
    table.add_column("share of a busy step", justify="right")
    table.add_column("what")
    busy = result["step_ms"]
    for phase, ms in result["phases_ms"].items():
        share = f"{100 * ms / busy:.1f}%" if phase not in ("publish", "idle") and busy else "-"
        table.add_row(phase, f"{ms:.2f}", share, PHASE_HELP[phase])
    table.add_row("busy step", f"{busy:.2f}", "100%", "schedule + forward + sample + update")
    console.print(table)
    console.print(
        f"output tokens/s {result['output_tokens_per_s']:.1f}; {result['steps_per_s']:.2f} steps/s; "
        f"{result['mean_decode_rows']:.1f} decode rows and {result['prefill_tokens_per_step']:.1f} prompt tokens "
        f"per step; {result['cached_prompt_tokens']} prompt tokens from the prefix cache; "
        f"max_step_tokens {result['max_step_tokens']}")
