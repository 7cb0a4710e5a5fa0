"""``python -m bench {http,baseline,compare}``: see ``--help`` of each."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench.stats import Figures

# Asks for a long answer, so most requests run to max_tokens: the API has no
# ignore_eos, and short answers would measure prefill more than decode.
DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."


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
    return ap


def _http(a: argparse.Namespace) -> Figures:
    from bench.http import HttpConfig, run

    return run(HttpConfig(base_url=a.base_url, model=a.model, prompt=a.prompt, concurrency=a.concurrency,
                          requests=a.requests, max_tokens=a.max_tokens, temperature=a.temperature,
                          api_key=a.api_key))


def _baseline(a: argparse.Namespace) -> Figures:
    from bench.baseline import BaselineConfig, run

    return run(BaselineConfig(model_path=a.model_path, prompt=a.prompt, requests=a.baseline_requests,
                              max_tokens=a.max_tokens, temperature=a.temperature, dtype=a.dtype,
                              device=a.device, seed=a.seed))


def main(argv: list[str] | None = None) -> int:
    from bench.report import render, write_json

    a = parser().parse_args(argv)
    # On a shared host other load skews every figure; record it so a reader can tell.
    load_start = os.getloadavg()
    runs: list[Figures] = []
    if a.cmd in ("baseline", "compare"):
        runs.append(_baseline(a))
    if a.cmd in ("http", "compare"):
        runs.append(_http(a))
    load_end = os.getloadavg()
    render(runs)
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; {os.cpu_count()} CPUs")
    if a.json is not None:
        meta: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        meta.update(loadavg_start=load_start, loadavg_end=load_end, cpu_count=os.cpu_count())
        write_json(a.json, runs, meta)
    return 1 if any(f.errors for f in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
