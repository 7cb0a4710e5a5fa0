"""A second, independent closed-loop client, to check ``bench http`` against.

``python -m bench.closedloop --base-url URL/v1 --model NAME --tokenizer DIR``

It shares no code with ``bench/http.py``'s requests and stream reading
(only ``bench/stats.py``'s percentile, so the two clients' figures
compare): plain httpx, its own reading of the SSE lines, and output
tokens counted by encoding the text each answer streamed with the model's
own tokenizer (not the server's ``usage``, which
not every server sends when streaming). ``--concurrency`` clients each send
the next of 8 short questions as soon as their last answer ended, until
``--requests`` answers are in. Short questions end at the model's own end
token, often well before ``--max-tokens``: so this client weighs what a
server costs per request (its time to first token) more than ``bench http``,
whose one long-story prompt runs every answer to ``--max-tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.stats import percentile  # the same percentile as bench http's figures, to compare them

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Which planet is closest to the sun?",
    "Translate 'thank you' into Spanish.",
    "What do bees make?",
)


@dataclass
class Answer:
    text: str = ""
    ttft_s: float | None = None
    total_s: float = 0.0
    error: str | None = None


@dataclass
class Result:
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    tokens_per_answer: float
    ttft_p50_s: float
    ttft_p99_s: float


async def ask(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Answer:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    answer, start = Answer(), time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                answer.error = f"http {resp.status_code}"
                return answer
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                for choice in json.loads(data).get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and answer.ttft_s is None:
                        answer.ttft_s = time.perf_counter() - start
                    answer.text += piece
    except httpx.HTTPError as exc:
        answer.error = type(exc).__name__
    answer.total_s = time.perf_counter() - start
    return answer


async def run(base_url: str, model: str, concurrency: int, requests: int, max_tokens: int,
              count: Any) -> Result:
    url = base_url.rstrip("/") + "/chat/completions"
    answers: list[Answer] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await ask(client, url, model, PROMPTS[0], 8)  # one warm-up answer, not counted

        async def loop() -> None:
            nonlocal sent
            while sent < requests:
                prompt = PROMPTS[sent % len(PROMPTS)]
                sent += 1
                answers.append(await ask(client, url, model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    good = [a for a in answers if a.error is None]
    tokens = [count(a.text) for a in good]
    ttfts = [a.ttft_s for a in good if a.ttft_s is not None] or [float("nan")]
    return Result(requests=len(answers), errors=len(answers) - len(good), output_tokens=sum(tokens), wall_s=wall,
                  tokens_per_s=sum(tokens) / wall, tokens_per_answer=statistics.fmean(tokens) if tokens else 0.0,
                  ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99))  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="the server's /v1 URL")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True, type=Path, help="a Hugging Face tokenizer directory")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from transformers import AutoTokenizer  # the client's own count; loaded once, before the clock starts

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    result = asyncio.run(run(args.base_url, args.model, args.concurrency, args.requests, args.max_tokens,
                             lambda text: len(tokenizer.encode(text, add_special_tokens=False))))
    print(f"tokens/s {result.tokens_per_s:.1f}  TTFT p50 {result.ttft_p50_s * 1000:.0f} ms  "
          f"p99 {result.ttft_p99_s * 1000:.0f} ms  tokens/answer {result.tokens_per_answer:.1f}  "
          f"requests {result.requests}  errors {result.errors}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
