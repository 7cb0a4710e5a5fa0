"""A load generator cheap enough not to be what saturates: N closed-loop
streaming clients on uvloop, raw sockets with keep-alive, httptools' C
parser for HTTP (it undoes the chunked encoding), and SSE events scanned as
bytes. Only the usage chunk at each stream's end is parsed as JSON; a token
chunk is recognised by its bytes and timed as they arrive.

``python -m bench.loadgen --url http://127.0.0.1:8000 --model m --streams 64
--seconds 20`` prints its figures as one JSON object (or writes ``--json``).
``llmq bench capacity`` runs it as a process of its own, so that its CPU is
counted apart from the server's. Clients are spread over every ``--url``
(API processes behind no balancer) in turn."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httptools

from bench.stats import itl_per_token, percentile

PROMPT = "Say something."
_CONTENT = b'"content":"'
_EMPTY = b'"content":""'


@dataclass
class Result:
    t_send: float
    t_first: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    status: int = 0
    error: str | None = None


class _Response:
    """httptools' callbacks for one response: the status, then body bytes
    scanned for SSE events (``\\r\\n\\r\\n`` ends one, as sse-starlette writes;
    ``\\n\\n`` too)."""

    def __init__(self, result: Result) -> None:
        self.result = result
        self.done = False
        self._buf = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        self._buf += body
        while True:
            end, width = self._buf.find(b"\r\n\r\n"), 4
            if end < 0:
                end, width = self._buf.find(b"\n\n"), 2
                if end < 0:
                    return
            event, self._buf = self._buf[:end], self._buf[end + width:]
            self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
            return
        if _CONTENT in event and _EMPTY not in event:
            if self.result.t_first is None:
                self.result.t_first = now
            self.result.chunk_times.append(now)
        if b'"usage":{' in event:
            usage = json.loads(event[6:]).get("usage") or {}
            self.result.completion_tokens = int(usage.get("completion_tokens") or 0)
        if b'"error"' in event and b'"choices"' not in event:
            self.result.error = "stream_error"

    def on_message_complete(self) -> None:
        self.done = True


async def _client(host: str, port: int, requests: list[bytes], deadline: float, out: list[Result],
                  rng: random.Random) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < deadline:
        if writer is None:
            reader, writer = await asyncio.open_connection(host, port)
        assert reader is not None
        result = Result(t_send=time.perf_counter())
        response = _Response(result)
        writer.write(requests[rng.randrange(len(requests))] if len(requests) > 1 else requests[0])
        try:
            while not response.done:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                response.parser.feed_data(data)
            result.status = response.parser.get_status_code()
            if result.status != 200:
                result.error = f"http_{result.status}"
        except (OSError, httptools.HttpParserError) as exc:
            result.error = type(exc).__name__
            writer.close()
            writer = None
        out.append(result)
    if writer is not None:
        writer.close()


def request_bytes(url: str, model: str, max_tokens: int, api_key: str | None) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST {parts.path.rstrip('/') or ''}/v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    return parts.hostname or "127.0.0.1", parts.port or 80, head.encode() + b"\r\n" + body


@dataclass
class LoadFigures:
    streams: int
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    error_kinds: dict[str, int]


def lengths(max_tokens: int, spread: float) -> list[int]:
    """The answer lengths asked for: ``max_tokens``, or nine spaced evenly
    over ``max_tokens`` x (1 +- ``spread``), drawn at random per request, so
    that closed-loop clients do not all end and restart on the same step."""
    if spread <= 0:
        return [max_tokens]
    return sorted({max(1, round(max_tokens * (1 - spread + 2 * spread * i / 8))) for i in range(9)})


async def run(urls: list[str], model: str, streams: int, seconds: float, max_tokens: int,
              api_key: str | None = None, spread: float = 0.0) -> LoadFigures:
    targets = []
    for u in urls:
        built = [request_bytes(u, model, n, api_key) for n in lengths(max_tokens, spread)]
        targets.append((built[0][0], built[0][1], [b for _, _, b in built]))
    out: list[Result] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_client(*targets[i % len(targets)], deadline, out, random.Random(i))
                           for i in range(streams)))
    wall = time.perf_counter() - started
    good = [r for r in out if r.error is None]
    tokens = sum(r.completion_tokens for r in good)
    ttfts = [r.t_first - r.t_send for r in good if r.t_first is not None]
    itls = [gap for r in good for gap in itl_per_token(r.chunk_times, r.completion_tokens)]
    kinds: dict[str, int] = {}
    for r in out:
        if r.error is not None:
            kinds[r.error] = kinds.get(r.error, 0) + 1
    return LoadFigures(streams=streams, requests=len(out), errors=len(out) - len(good), output_tokens=tokens,
                       wall_s=wall, tokens_per_s=tokens / wall if wall else 0.0,
                       ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
                       itl_p50_s=percentile(itls, 50), itl_p99_s=percentile(itls, 99), error_kinds=kinds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    ap.add_argument("--url", action="append", required=True, help="an API's base URL (repeatable)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=64, help="concurrent closed-loop streams")
    ap.add_argument("--seconds", type=float, default=20.0, help="no request starts after this")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-tokens-spread", type=float, default=0.0, metavar="F",
                    help="each request asks for max_tokens x (1 +- F), at random (0: all alike)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    import uvloop

    figures = uvloop.run(run(args.url, args.model, args.streams, args.seconds, args.max_tokens, args.api_key,
                             args.max_tokens_spread))
    text = json.dumps(asdict(figures))
    if args.json is not None:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

