"""An engine defined here alone, plugged into a real worker.

``EchoEngine`` answers with the words of its prompt, one word a token, a
step every ``--echo-step-ms``: its own worker option. It is built on
``worker/engines/loop.py``'s skeleton, which gives it submit, cancel, the
step clock and the batcher; ``n`` choices are one request each. ``ECHO``
declares it, and the worker finds it the way it finds any engine installed
by another package: an entry point in the group ``llmq.engines``
(``worker/engines/registry.py``), here from a ``.dist-info`` folder written
into a temporary directory on the worker's ``PYTHONPATH``.

The test starts Redis, the API and ``llmq worker --engine echo`` and talks
to them with the openai client: a whole answer, one cut at ``max_tokens``,
a streamed answer with two choices, and a stream the client drops, which
the engine cancels.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import click
import openai
import pytest

from tests.procs import DEMO_MODEL_DIR, Proc, spawn, start_api, start_redis, wait_for, wait_model
from worker.engines.loop import LoopEngine, Request
from worker.engines.protocol import Update
from worker.engines.registry import EngineKind, EngineOptions
from worker.loading import ModelSpec, load_tokenizer
from worker.publish import Publisher
from worker.toolcalls import format_for

pytestmark = pytest.mark.e2e

MODEL = "echo-m"
STEP_MS = 20


@dataclass(frozen=True, kw_only=True)
class EchoOptions(EngineOptions):
    step_s: float = STEP_MS / 1000

    @classmethod
    def read(cls, opts: Mapping[str, Any]) -> Self:
        return cls(**cls.common(opts), step_s=(opts.get("echo_step_ms") or STEP_MS) / 1000)


class EchoEngine(LoopEngine):
    kind = "echo"
    PER_CHOICE = True

    def __init__(self, spec: ModelSpec, options: EchoOptions, publisher: Publisher) -> None:
        self.tokenizer = load_tokenizer(spec)  # the runtime builds prompts with it
        self.vocab_size = len(self.tokenizer)
        self.context_length = spec.context_length or 2048
        self.device = "cpu"
        self.step = options.step_s
        super().__init__(spec.served_names(), format_for(self.tokenizer, options.tool_call_parser), publisher)

    def healthy(self) -> bool:
        return self._loop_thread.is_alive()

    def check(self, job: Any) -> None:
        """Every option is taken (and ignored: this engine only echoes)."""

    async def generate(self, request: Request) -> None:
        (choice,) = request.choices
        words = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=True).split()
        for i, word in enumerate(words[: request.max_tokens]):
            await asyncio.sleep(self.step)
            finish = "stop" if i == len(words) - 1 else "length" if i == request.max_tokens - 1 else None
            self.tick()
            self.put([Update(choice, text=f" {word}" if i else word, tokens=1, finish=finish)])


ECHO = EngineKind(name="echo", engine=f"{__name__}:EchoEngine", summary="echo (a test's)", options_type=EchoOptions,
                  options=[click.Option(["--echo-step-ms"], type=int, default=STEP_MS, help="echo: ms a word")])


@dataclass
class EchoStack:
    v1: str
    worker: Proc

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoStack]:
    plugins = tmp_path_factory.mktemp("plugins")
    info = plugins / "llmq_echo_engine-0.1.dist-info"  # what `pip install` of a package declaring it writes
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmq-echo-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[llmq.engines]\necho = {__name__}:ECHO\n")
    redis, port = start_redis(tmp_path_factory.mktemp("redis-echo"))
    env = {"LLMQ_REDIS_URL": f"redis://127.0.0.1:{port}/0", "LLMQ_HEARTBEAT_INTERVAL_S": "0.5",
           "LLMQ_HEARTBEAT_TTL_S": "2.0", "LLMQ_REGISTRY_CACHE_S": "0.2", "PYTHONPATH": str(plugins)}
    api, base = start_api(env, name="api-echo")
    worker = spawn("worker-echo", [sys.executable, "-m", "cli.main", "worker", "--engine", "echo",
                                   "--model-path", str(DEMO_MODEL_DIR), "--model-name", MODEL, "--concurrency", "4",
                                   "--hostname", "echo@%h", "--echo-step-ms", str(STEP_MS)], env)
    try:
        wait_model(base, MODEL, worker)
        yield EchoStack(v1=f"{base}/v1", worker=worker)
    finally:
        for proc in (worker, api, redis):
            proc.stop()


def ask(words: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": words}]


def test_a_whole_answer_and_one_cut_at_max_tokens(echo: EchoStack) -> None:
    client = echo.client()
    whole = client.chat.completions.create(model=MODEL, messages=ask("seven silver swans swam south"))
    text = whole.choices[0].message.content or ""
    assert text.endswith("seven silver swans swam south assistant"), text  # the template's words, then the user's
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == len(text.split())
    cut = client.chat.completions.create(model=MODEL, messages=ask("seven silver swans"), max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and len((cut.choices[0].message.content or "").split()) == 3
    assert text.startswith(cut.choices[0].message.content or "-")


def test_a_streamed_answer_with_two_choices(echo: EchoStack) -> None:
    stream = echo.client().chat.completions.create(model=MODEL, messages=ask("one two three"), n=2, stream=True,
                                                   stream_options={"include_usage": True})
    texts, pieces, finishes, usage = ["", ""], [0, 0], [None, None], None
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                texts[c.index] += c.delta.content
                pieces[c.index] += 1
            finishes[c.index] = c.finish_reason or finishes[c.index]
        usage = chunk.usage or usage
    assert texts[0] == texts[1] and texts[0].endswith("one two three assistant"), texts
    assert finishes == ["stop", "stop"] and pieces[0] >= len(texts[0].split()) // 2  # streamed, not in one piece
    assert usage is not None and usage.completion_tokens == 2 * len(texts[0].split())


def test_a_dropped_stream_is_cancelled_in_the_engine(echo: EchoStack) -> None:
    client = echo.client()
    stream = client.chat.completions.create(model=MODEL, messages=ask("word " * 500), stream=True)
    got = 0
    for chunk in stream:
        got += sum(1 for c in chunk.choices if c.delta.content)
        if got >= 5:
            break
    stream.close()  # the client hangs up; the API cancels the job

    def cancelled() -> list[int]:
        return [int(n) for n in re.findall(r"cancelled after (\d+) tokens", echo.worker.log.read_text(errors="replace"))]

    wait_for(lambda: bool(cancelled()), 10, "the echo engine's cancel")
    assert cancelled()[0] < 100  # of ~500 words: it stopped when the client left, not at the end
