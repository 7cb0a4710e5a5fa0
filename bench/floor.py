"""The floor of ``llmq bench capacity``: a bare FastAPI + sse-starlette
endpoint that streams chat completion chunks from memory, with no queue, no
Redis and no worker, at the synthetic engine's pace (the same step clock:
a request joins at the next step and gets a token at the end of each step
it runs in). What llmq's API costs per token beyond this, and what it adds
to the time to first token and between tokens, is llmq's own.

``python -m bench.floor --port 8090 --step-ms 20``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse

from worker.engines.synthetic.words import PASSAGE


class StepClock:
    """Every ``step_s`` each running stream gets its next token; a stream
    that arrives meanwhile joins at the next step (as the synthetic engine's
    rows do). ``next()`` is the end of the step in progress: the streams it
    wakes ask again before the next step ends, and get that one."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._tick: asyncio.Future[None] | None = None
        self._asked = 0  # next() calls during the step in progress
        self._task: asyncio.Task[None] | None = None

    async def join(self) -> None:
        """Wait for the step in progress, if any: the next one is this stream's first."""
        if self._task is not None and not self._task.done():
            await self.next()

    def next(self) -> asyncio.Future[None]:
        if self._task is None or self._task.done():
            self._tick = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run())
        assert self._tick is not None
        self._asked += 1
        return self._tick

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = max(due + self.step_s, loop.time())
            await asyncio.sleep(due - loop.time())
            assert self._tick is not None
            tick, self._tick = self._tick, loop.create_future()
            tick.set_result(None)
            if not self._asked:
                return  # a step nobody waited for: idle until the next stream
            self._asked = 0


def create_app(step_s: float) -> FastAPI:
    app = FastAPI()
    clock, paced = StepClock(step_s), step_s > 0  # 0: every chunk at once, the cost of the send path alone
    words = PASSAGE.split(" ")
    pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words) if w]

    def chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
              usage: dict[str, int] | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "service_tier": "default", "system_fingerprint": None, "choices": choices,
                           "usage": usage}, separators=(",", ":"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> EventSourceResponse:
        body = await request.json()
        tokens, model = int(body.get("max_tokens") or 16), str(body.get("model"))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        async def events() -> AsyncIterator[dict[str, str]]:
            yield {"data": chunk(cid, created, model, {"role": "assistant", "content": ""})}
            if paced:
                await clock.join()
            for i in range(tokens):
                if paced:
                    await clock.next()
                yield {"data": chunk(cid, created, model, {"content": pieces[i % len(pieces)]})}
            yield {"data": chunk(cid, created, model, {}, "length")}
            usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
            yield {"data": chunk(cid, created, model, {}, usage=usage)}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--step-ms", type=float, default=20.0)
    args = ap.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(args.step_ms / 1000), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
