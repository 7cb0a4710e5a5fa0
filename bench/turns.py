"""Chat turn 2 after a long turn 1: what prefix caching saves.

Each conversation opens with a long user message (a document of about
``prefix_tokens`` tokens, different per conversation, so turn 1 never hits
the cache of another), then asks a second question with turn 1's prompt and
answer as history. Turn 2's prompt repeats all of turn 1, so a worker with
prefix caching computes only the new tail. One conversation at a time, over
HTTP, streaming; prints the time to first token of each turn.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx

from bench.http import one_request
from bench.stats import RequestResult, percentile

WORDS = ("harbor lamp keeper storm night wave rock ship light tower sea wind salt rope bell fog gull cliff tide "
         "lantern oil glass stair door log coast sail mast anchor reef shore dawn dusk star cloud rain").split()


@dataclass(frozen=True)
class TurnsConfig:
    base_url: str
    model: str
    prefix_tokens: int = 1500
    conversations: int = 5
    max_tokens: int = 32
    api_key: str | None = None


def document(i: int, tokens: int) -> str:
    """About ``tokens`` tokens of text that differs from its first words on."""
    rng = random.Random(i)
    words = [f"Logbook {i}."] + [rng.choice(WORDS) for _ in range(int(tokens * 0.95))]
    return " ".join(words)


async def _turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]],
                max_tokens: int) -> RequestResult:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await one_request(client, url, body)
    if r.error is not None:
        raise RuntimeError(f"request to {url} failed: {r.error}")
    return r


async def run_async(cfg: TurnsConfig) -> dict[str, object]:
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    first: list[RequestResult] = []
    second: list[RequestResult] = []
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        await _turn(client, url, cfg.model, [{"role": "user", "content": "Hi"}], 2)  # warm-up
        for i in range(cfg.conversations):
            history = [{"role": "user", "content": document(i, cfg.prefix_tokens) + "\n\nSummarise this logbook."}]
            t1 = await _turn(client, url, cfg.model, history, cfg.max_tokens)
            history += [{"role": "assistant", "content": t1.text}, {"role": "user", "content": "Give it a title."}]
            t2 = await _turn(client, url, cfg.model, history, cfg.max_tokens)
            first.append(t1)
            second.append(t2)

    def p50(rs: list[RequestResult]) -> float | None:
        return percentile([r.ttft for r in rs if r.ttft is not None], 50)

    return {"conversations": cfg.conversations, "turn1_prompt_tokens": first[0].prompt_tokens,
            "turn2_prompt_tokens": second[0].prompt_tokens, "turn1_ttft_p50_s": p50(first),
            "turn2_ttft_p50_s": p50(second)}


def run(cfg: TurnsConfig) -> dict[str, object]:
    return asyncio.run(run_async(cfg))
