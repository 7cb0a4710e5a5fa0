"""``python -m bench {http,baseline,compare,constrained,profile,turns,soak,priority,capacity,fairness,lora}``: see ``--help`` of each."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.stats import Figures

# Asks for a long answer, so most requests run to max_tokens: the API has no
# ignore_eos, and short answers would measure prefill more than decode.
DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."
# The constrained run's schema: the story inside a JSON object, long enough
# (minLength) that its requests also run to max_tokens, so the two runs
# differ only in the grammar.
STORY_FORMAT: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "story", "schema": {
    "type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                     "story": {"type": "string", "minLength": 2000}},
    "required": ["title", "story"], "additionalProperties": False}}}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per request")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message sent as chat")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 is greedy)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")


def _http_args(p: argparse.ArgumentParser, requests: int) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API's /v1 URL")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=requests, help="requests in the HTTP run")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--unique-prompts", action="store_true",
                   help="number each prompt, so requests share no cached prefix (measures prefill)")


def _baseline_args(p: argparse.ArgumentParser, flag: str, requests: int) -> None:
    p.add_argument("--model-path", required=True, help="model directory, HF id or .gguf (as the worker takes)")
    p.add_argument(flag, dest="baseline_requests", type=int, default=requests, help="requests, one at a time")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=None)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("http", help="drive a running stack over HTTP")
    _http_args(h, 32)
    _common(h)
    b = sub.add_parser("baseline", help="the same model in-process, one request at a time")
    _baseline_args(b, "--requests", 8)
    _common(b)
    c = sub.add_parser("compare", help="baseline, then http, and their ratio")
    _http_args(c, 32)
    _baseline_args(c, "--baseline-requests", 4)
    _common(c)
    st = sub.add_parser("constrained", help="http twice, free then held to a JSON schema: the cost of the grammar")
    _http_args(st, 32)
    _common(st)
    pr = sub.add_parser("profile", help="the engine's step in-process: where the time goes at a given batch")
    pr.add_argument("--model-path", required=True, help="model directory, HF id or .gguf (as the worker takes)")
    pr.add_argument("--batch", type=int, default=16, help="concurrent requests kept running (the batch)")
    pr.add_argument("--seconds", type=float, default=20.0, help="measured time, after the warm-up")
    pr.add_argument("--warmup", type=float, default=5.0, help="seconds run before measuring")
    pr.add_argument("--max-step-tokens", type=int, default=None, help="the worker option of that name")
    pr.add_argument("--no-prefix-caching", action="store_true", help="the worker option of that name")
    pr.add_argument("--unique-prompts", action="store_true", help="as for http: requests share no cached prefix")
    pr.add_argument("--redis-url", default=None, help="publish here (default: start a redis-server on a free port)")
    _common(pr)
    pr.set_defaults(temperature=0.0)
    t = sub.add_parser("turns", help="time to first token of chat turn 2 after a long turn 1 (prefix caching)")
    t.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the API's /v1 URL")
    t.add_argument("--model", required=True, help="served model name")
    t.add_argument("--prefix-tokens", type=int, default=1500, help="about this many tokens in turn 1's message")
    t.add_argument("--conversations", type=int, default=5, help="conversations, one at a time")
    t.add_argument("--max-tokens", type=int, default=32, help="max new tokens per turn")
    t.add_argument("--api-key", default=None, help="sent as a Bearer token")
    t.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    so = sub.add_parser("soak", help="minutes of mixed load on a stack it starts, a worker restarted halfway")
    so.add_argument("--minutes", type=float, default=20.0)
    so.add_argument("--clients", type=int, default=8)
    so.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory and key-count samples")
    so.add_argument("--key-ttl-s", type=int, default=60, help="how long per-job keys live (warm-up: twice this)")
    pi = sub.add_parser("priority", help="interactive clients' TTFT on an idle worker, then beside a running batch")
    _http_args(pi, 96)
    _common(pi)
    pi.set_defaults(max_tokens=32)
    pi.add_argument("--service-tier", default=None, choices=["auto", "default", "flex", "priority"],
                    help="the interactive clients' service_tier (default: not sent)")
    pi.add_argument("--batch-lines", type=int, default=2000, help="lines in the batch")
    pi.add_argument("--batch-max-tokens", type=int, default=32, help="max_tokens of each batch line")
    pi.add_argument("--alone-s", type=float, default=20.0, help="seconds the batch's lines/s is taken alone")
    pi.add_argument("--keep-batch", action="store_true", help="let the batch finish instead of cancelling it")
    ca = sub.add_parser("capacity", help="llmq's own per-token cost: synthetic workers, CPU per token by process, "
                                         "beside a bare FastAPI + sse-starlette floor")
    ca.add_argument("--api-procs", type=int, default=1, help="API processes it starts (clients spread over them)")
    ca.add_argument("--workers", type=int, default=1, help="synthetic workers it starts")
    ca.add_argument("--streams", type=int, default=64, help="concurrent closed-loop streams")
    ca.add_argument("--seconds", type=float, default=20.0, help="measured time")
    ca.add_argument("--max-tokens", type=int, default=64, help="tokens each answer streams")
    ca.add_argument("--step-ms", type=float, default=20.0, help="the synthetic engine's step time")
    ca.add_argument("--batch", type=int, default=None, help="rows per worker (default: streams / workers)")
    ca.add_argument("--url", default=None, help="measure this running stack instead (client figures only; "
                                                "it must serve a model named 'synthetic')")
    ca.add_argument("--no-floor", action="store_true", help="skip the bare FastAPI + sse-starlette floor")
    ca.add_argument("--floor-step-ms", type=float, default=None,
                    help="the floor's pace (default: --step-ms; 0: each answer's chunks at once)")
    ca.add_argument("--worker-args", default="", help="more options for every worker, written with '=': --worker-args='--stream-interval 4'")
    ca.add_argument("--logs", type=Path, default=None, help="where the processes' logs go (default: a temp dir)")
    ca.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    lo = sub.add_parser("lora", help="a running stack: the base model alone, then its LoRA adapters mixed, "
                                     "and their tokens/s ratio")
    _http_args(lo, 96)
    _common(lo)
    lo.add_argument("--adapters", required=True, help="comma-separated adapter names the worker serves (--lora)")
    lo.add_argument("--ban-token", type=int, default=None,
                    help="a token id no answer may use (the end token: every answer runs to --max-tokens)")
    lo.add_argument("--rounds", type=int, default=2, help="base then mixed, this many times")
    fa = sub.add_parser("fairness", help="a key with few clients beside one that floods the model: fair share "
                                         "against first come, first served, on synthetic workers")
    fa.add_argument("--a-streams", type=int, default=32, help="key A's closed-loop streams")
    fa.add_argument("--b-streams", type=int, default=2, help="key B's closed-loop streams")
    fa.add_argument("--a-tokens", type=int, default=256, help="tokens of each of key A's answers")
    fa.add_argument("--b-tokens", type=int, default=32, help="tokens of each of key B's answers")
    fa.add_argument("--spread", type=float, default=0.5, help="each answer asks for its tokens x (1 +- this)")
    fa.add_argument("--threads", type=int, default=16, help="the synthetic worker's threads (batch rows)")
    fa.add_argument("--step-ms", type=float, default=20.0, help="the synthetic engine's step time")
    fa.add_argument("--seconds", type=float, default=30.0, help="each of the four phases")
    fa.add_argument("--logs", type=Path, default=None, help="where the processes' logs go (default: a temp dir)")
    fa.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    return ap


def _lora(a: argparse.Namespace) -> list[Figures]:
    from dataclasses import replace

    from bench.http import HttpConfig, run

    base = HttpConfig(base_url=a.base_url, model=a.model, prompt=a.prompt, concurrency=a.concurrency,
                      requests=a.requests, max_tokens=a.max_tokens, temperature=a.temperature, api_key=a.api_key,
                      unique_prompts=a.unique_prompts, ban_token=a.ban_token, label="base")
    mixed = replace(base, models=tuple(n.strip() for n in a.adapters.split(",") if n.strip()), label="adapters")
    runs: list[Figures] = []
    for _ in range(a.rounds):
        runs += [run(base), run(mixed)]
    return runs


def _fairness(a: argparse.Namespace) -> int:
    from bench.fairness import FairnessConfig, report, run

    cfg = FairnessConfig(a_streams=a.a_streams, b_streams=a.b_streams, threads=a.threads, a_tokens=a.a_tokens,
                         b_tokens=a.b_tokens, spread=a.spread, step_ms=a.step_ms, seconds=a.seconds, logs=a.logs)
    load_start = os.getloadavg()
    result = run(cfg)
    report(cfg, result)
    result.update(loadavg_start=load_start, loadavg_end=os.getloadavg(), cpu_count=os.cpu_count())
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {result['loadavg_end'][0]:.2f}; "
          f"{os.cpu_count()} CPUs")
    _write_json(a.json, result)
    return 1 if any(p["errors"] for p in result["policies"].values()) else 0


def _capacity(a: argparse.Namespace) -> int:
    from bench.capacity import CapacityConfig, report, run

    cfg = CapacityConfig(api_procs=a.api_procs, workers=a.workers, streams=a.streams, seconds=a.seconds,
                         max_tokens=a.max_tokens, step_ms=a.step_ms, batch=a.batch, url=a.url,
                         floor=not a.no_floor, floor_step_ms=a.floor_step_ms, worker_args=tuple(a.worker_args.split()),
                         logs=a.logs)
    load_start = os.getloadavg()
    sides = run(cfg)
    result = report(cfg, sides)
    result.update(loadavg_start=load_start, loadavg_end=os.getloadavg(), cpu_count=os.cpu_count())
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {result['loadavg_end'][0]:.2f}; "
          f"{os.cpu_count()} CPUs")
    _write_json(a.json, result)
    return 1 if any(s.load["errors"] for s in sides) else 0


def _priority(a: argparse.Namespace) -> int:
    from bench.priority import PriorityConfig, render, run

    load_start = os.getloadavg()
    result = run(PriorityConfig(base_url=a.base_url, model=a.model, prompt=a.prompt, api_key=a.api_key,
                                concurrency=a.concurrency, requests=a.requests, max_tokens=a.max_tokens,
                                temperature=a.temperature, unique_prompts=a.unique_prompts,
                                service_tier=a.service_tier, batch_lines=a.batch_lines,
                                batch_max_tokens=a.batch_max_tokens, alone_s=a.alone_s, keep_batch=a.keep_batch))
    result.update(loadavg_start=load_start, loadavg_end=os.getloadavg(), cpu_count=os.cpu_count())
    render(result)
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {result['loadavg_end'][0]:.2f}; "
          f"{os.cpu_count()} CPUs")
    _write_json(a.json, result)
    return 1 if result["idle"]["errors"] or result["with_batch"]["errors"] else 0


def _soak(a: argparse.Namespace) -> int:
    from bench.soak import SoakConfig, run

    _, ok = run(SoakConfig(minutes=a.minutes, clients=a.clients, sample_s=a.sample_s, key_ttl_s=a.key_ttl_s))
    return 0 if ok else 1


def _turns(a: argparse.Namespace) -> int:
    from bench.turns import TurnsConfig, run

    result = run(TurnsConfig(base_url=a.base_url, model=a.model, prefix_tokens=a.prefix_tokens,
                             conversations=a.conversations, max_tokens=a.max_tokens, api_key=a.api_key))
    ms = {k: (None if v is None else round(1000 * v, 1)) for k, v in result.items() if k.endswith("_s")}
    print(f"{result['conversations']} conversations; prompt tokens turn 1 {result['turn1_prompt_tokens']}, "
          f"turn 2 {result['turn2_prompt_tokens']}; TTFT p50 turn 1 {ms['turn1_ttft_p50_s']} ms, "
          f"turn 2 {ms['turn2_ttft_p50_s']} ms")
    _write_json(a.json, result)
    return 0


def _profile(a: argparse.Namespace) -> int:
    from bench.profile import ProfileConfig, render, run

    result = run(ProfileConfig(model_path=a.model_path, batch=a.batch, seconds=a.seconds, warmup_s=a.warmup,
                               max_tokens=a.max_tokens, prompt=a.prompt, temperature=a.temperature,
                               max_step_tokens=a.max_step_tokens, prefix_caching=not a.no_prefix_caching,
                               unique_prompts=a.unique_prompts, redis_url=a.redis_url))
    render(result)
    _write_json(a.json, result)
    return 0 if result["steps"] else 1


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def _http(a: argparse.Namespace, response_format: dict[str, Any] | None = None, label: str = "http") -> Figures:
    from bench.http import HttpConfig, run

    return run(HttpConfig(base_url=a.base_url, model=a.model, prompt=a.prompt, concurrency=a.concurrency,
                          requests=a.requests, max_tokens=a.max_tokens, temperature=a.temperature,
                          api_key=a.api_key, unique_prompts=a.unique_prompts, response_format=response_format,
                          label=label))


def _baseline(a: argparse.Namespace) -> Figures:
    from bench.baseline import BaselineConfig, run

    return run(BaselineConfig(model_path=a.model_path, prompt=a.prompt, requests=a.baseline_requests,
                              max_tokens=a.max_tokens, temperature=a.temperature, dtype=a.dtype,
                              device=a.device, seed=a.seed))


def main(argv: list[str] | None = None) -> int:
    from bench.report import render, write_json

    a = parser().parse_args(argv)
    if a.cmd == "profile":
        return _profile(a)
    if a.cmd == "turns":
        return _turns(a)
    if a.cmd == "soak":
        return _soak(a)
    if a.cmd == "priority":
        return _priority(a)
    if a.cmd == "capacity":
        return _capacity(a)
    if a.cmd == "fairness":
        return _fairness(a)
    # On a shared host other load skews every figure; record it so a reader can tell.
    load_start = os.getloadavg()
    runs: list[Figures] = []
    if a.cmd in ("baseline", "compare"):
        runs.append(_baseline(a))
    if a.cmd in ("http", "compare"):
        runs.append(_http(a))
    if a.cmd == "constrained":
        runs += [_http(a, label="free"), _http(a, STORY_FORMAT, label="json schema")]
    if a.cmd == "lora":
        runs += _lora(a)
    load_end = os.getloadavg()
    render(runs)
    if a.cmd == "constrained" and runs[0].tokens_per_s and runs[1].tokens_per_s:
        print(f"constrained / free output tokens/s: {runs[1].tokens_per_s / runs[0].tokens_per_s:.3f}")
    if a.cmd == "lora":
        ratios = [m.tokens_per_s / b.tokens_per_s for b, m in zip(runs[::2], runs[1::2]) if b.tokens_per_s]
        print("adapters mixed / base output tokens/s, each round: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; {os.cpu_count()} CPUs")
    if a.json is not None:
        meta: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        meta.update(loadavg_start=load_start, loadavg_end=load_end, cpu_count=os.cpu_count())
        write_json(a.json, runs, meta)
    return 1 if any(f.errors for f in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
