"""The HTTP run: N concurrent streaming clients against a running stack's
``/chat/completions``, each taking the next request as soon as its last one
ends (a closed loop, so the server always has N requests to batch)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from bench.sse import SSEParser, StreamRecorder
from bench.stats import Figures, RequestResult, summarise


@dataclass(frozen=True)
class HttpConfig:
    base_url: str
    model: str
    prompt: str
    concurrency: int = 16
    requests: int = 32
    max_tokens: int = 64
    temperature: float = 0.7
    api_key: str | None = None
    timeout_s: float = 600.0
    warmup: int = 1
    unique_prompts: bool = False  # number each prompt, so no two share a cached prefix beyond the template's
    response_format: dict[str, Any] | None = None  # a constrained run (``python -m bench constrained``)
    service_tier: str | None = None  # sent when set (``python -m bench priority``)
    models: tuple[str, ...] = ()  # requests take these in turn instead of ``model`` (``python -m bench lora``)
    ban_token: int | None = None  # a token id the answers may not use (the end token: every answer runs to max_tokens)
    label: str = "http"


def payload(cfg: HttpConfig, max_tokens: int | None = None, number: int | None = None) -> dict[str, Any]:
    # No ignore_eos in the API: usage counts the real tokens instead, and a
    # prompt that asks for a long answer keeps most requests at max_tokens.
    prompt = cfg.prompt if number is None or not cfg.unique_prompts else f"Request {number}. {cfg.prompt}"
    body: dict[str, Any] = {
        "model": cfg.models[(number or 0) % len(cfg.models)] if cfg.models else cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens or cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.response_format is not None:
        body["response_format"] = cfg.response_format
    if cfg.ban_token is not None:
        body["logit_bias"] = {str(cfg.ban_token): -100}
    if cfg.service_tier is not None:
        body["service_tier"] = cfg.service_tier
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    rec = StreamRecorder(time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                rec.result.error = f"http_{resp.status_code}"
                return rec.finish(time.perf_counter())
            parser = SSEParser()
            async for raw in resp.aiter_bytes():  # decoded if the server compresses
                # One clock read per network chunk: the events in it arrived together.
                now = time.perf_counter()
                for data in parser.feed(raw):
                    rec.on_data(now, data)
            for data in parser.close():
                rec.on_data(time.perf_counter(), data)
    except httpx.HTTPError as exc:
        rec.result.error = type(exc).__name__
    return rec.finish(time.perf_counter())


async def run_async(cfg: HttpConfig) -> Figures:
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # A new connection per request, for every system alike: llama-server now and
    # then drops a kept-alive connection after a streamed answer, and the next
    # request on it would count as its error.
    limits = httpx.Limits(max_connections=cfg.concurrency + 1, max_keepalive_connections=0)
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        for _ in range(cfg.warmup):
            # A short request first: fails fast on a wrong URL or model name, and
            # opens a connection so the timed run does not start with a cold API.
            warm = await one_request(client, url, payload(cfg, max_tokens=4))
            if warm.error is not None:
                raise RuntimeError(f"warm-up request to {url} failed: {warm.error}")

        remaining = iter(range(cfg.requests))
        results: list[RequestResult] = []

        async def client_loop() -> None:
            for number in remaining:  # the shared iterator hands each request to exactly one loop
                results.append(await one_request(client, url, payload(cfg, number=number)))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(min(cfg.concurrency, cfg.requests))))
        wall = time.perf_counter() - t0
    return summarise(cfg.label, results, wall, cfg.concurrency, cfg.max_tokens)


def run(cfg: HttpConfig) -> Figures:
    return asyncio.run(run_async(cfg))
