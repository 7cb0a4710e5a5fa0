"""Per-request records and the figures computed from them. Pure functions, so
both the HTTP run and the in-process baseline summarise the same way."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestResult:
    """One request as the client saw it; all times are ``perf_counter`` seconds."""

    t_send: float
    t_first: float | None = None  # first non-empty content
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    completion_tokens: int | None = None  # from the usage chunk: the only honest token count
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    t_end: float | None = None
    error: str | None = None
    text: str = ""  # the answer, for a next turn

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest
    ranks, as numpy's default does; ``None`` for no values rather than a made-up 0."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def itl_per_token(chunk_times: list[float], completion_tokens: int | None) -> list[float]:
    """Gaps between consecutive content chunks of one request, each divided by
    the mean tokens per chunk. A chunk can hold several tokens (the detokenizer
    holds back split characters; a slow reader gets events coalesced), and an
    un-normalised gap would then count as one long token instead of several
    short ones. The first chunk has no gap: its wait is TTFT."""
    if len(chunk_times) < 2:
        return []
    tokens_per_chunk = (completion_tokens or len(chunk_times)) / len(chunk_times)
    tokens_per_chunk = max(tokens_per_chunk, 1.0)  # fewer tokens than chunks means a bad count; don't inflate
    return [(b - a) / tokens_per_chunk for a, b in zip(chunk_times, chunk_times[1:])]


@dataclass
class Figures:
    """What one run prints and writes to JSON."""

    name: str
    requests: int
    ok: int
    errors: int
    concurrency: int
    max_tokens: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    mean_output_tokens: float | None
    mean_prompt_tokens: float | None
    hit_max_tokens: int  # requests that stopped at max_tokens, not EOS
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(name: str, results: list[RequestResult], wall_s: float, concurrency: int, max_tokens: int) -> Figures:
    good = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens or 0 for r in good)
    ttfts = [r.ttft for r in good if r.ttft is not None]
    itls = [gap for r in good for gap in itl_per_token(r.chunk_times, r.completion_tokens)]
    prompts = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
    kinds: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            kinds[r.error] = kinds.get(r.error, 0) + 1
    return Figures(
        name=name,
        requests=len(results),
        ok=len(good),
        errors=len(results) - len(good),
        concurrency=concurrency,
        max_tokens=max_tokens,
        output_tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(good) / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        mean_output_tokens=tokens / len(good) if good else None,
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        hit_max_tokens=sum(1 for r in good if r.finish_reason == "length"),
        error_kinds=kinds,
    )
