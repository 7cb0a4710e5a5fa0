"""The synthetic engine in a real worker: ``llmq worker --engine synthetic``
with nothing but a model name (and one with the demo model's tokenizer),
behind a real API, called with the openai client."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.procs import DEMO_MODEL_DIR, Proc, spawn, start_api, start_redis, wait_for, wait_model
from worker.engines.synthetic.words import PASSAGE, WordTokenizer

pytestmark = pytest.mark.e2e

NAMED = "synth-words"  # no files: its own word list
TOKENIZED = "synth-tok"  # the demo model's tokenizer
INTERVAL = "synth-interval"  # --stream-interval 4
STEP_MS = 10
OUTPUT_TOKENS = 24


@dataclass
class Synth:
    base: str
    words: Proc
    tokenized: Proc
    interval: Proc

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=60)


def synthetic_worker(name: str, env: dict[str, str], *model: str) -> Proc:
    return spawn(name, [sys.executable, "-m", "cli.main", "worker", "--engine", "synthetic", *model,
                        "--concurrency", "8", "--hostname", f"{name}@%h", "--synthetic-step-ms", str(STEP_MS),
                        "--synthetic-output-tokens", str(OUTPUT_TOKENS)], env)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synth]:
    redis, port = start_redis(tmp_path_factory.mktemp("redis-synth"))
    env = {"LLMQ_REDIS_URL": f"redis://127.0.0.1:{port}/0", "LLMQ_HEARTBEAT_INTERVAL_S": "0.5",
           "LLMQ_HEARTBEAT_TTL_S": "2.0", "LLMQ_REGISTRY_CACHE_S": "0.2"}
    api, base = start_api(env, name="api-synth")
    words = synthetic_worker("worker-synth-words", env, "--model-name", NAMED)
    tokenized = synthetic_worker("worker-synth-tok", env, "--model-path", str(DEMO_MODEL_DIR),
                                 "--model-name", TOKENIZED)
    interval = synthetic_worker("worker-synth-interval", env, "--model-name", INTERVAL, "--stream-interval", "4")
    try:
        wait_model(base, NAMED, words)
        wait_model(base, TOKENIZED, tokenized)
        wait_model(base, INTERVAL, interval)
        yield Synth(base=base, words=words, tokenized=tokenized, interval=interval)
    finally:
        for proc in (words, tokenized, interval, api, redis):
            proc.stop()


def ask(text: str = "Say something.") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("model", [NAMED, TOKENIZED])
def test_a_greedy_answer_is_the_passage_at_the_set_length(synth: Synth, model: str) -> None:
    started = time.monotonic()
    out = synth.client().chat.completions.create(model=model, messages=ask(), temperature=0)
    took = time.monotonic() - started
    text = out.choices[0].message.content or ""
    assert PASSAGE.startswith(text) and len(text.split()) >= OUTPUT_TOKENS // 2, text
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == OUTPUT_TOKENS and out.usage.prompt_tokens > 3
    assert took >= OUTPUT_TOKENS * STEP_MS / 1000  # paced: a token a step, never faster


def test_max_tokens_n_and_seeds(synth: Synth) -> None:
    client = synth.client()
    cut = client.chat.completions.create(model=NAMED, messages=ask(), max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None and cut.usage.completion_tokens == 5
    assert cut.choices[0].message.content == "This answer comes from the"
    many = client.chat.completions.create(model=NAMED, messages=ask(), n=3, max_tokens=6, seed=11)
    texts = [c.message.content for c in many.choices]
    assert len(set(texts)) > 1 and all(t and t.strip() for t in texts), texts
    again = client.chat.completions.create(model=NAMED, messages=ask(), n=3, max_tokens=6, seed=11)
    assert [c.message.content for c in again.choices] == texts  # the seed decides


def test_a_stop_string_ends_the_answer_before_it(synth: Synth) -> None:
    out = synth.client().chat.completions.create(model=NAMED, messages=ask(), stop=[" engine"], temperature=0)
    assert out.choices[0].message.content == "This answer comes from the synthetic"
    assert out.choices[0].finish_reason == "stop"


def test_banning_the_end_token_runs_to_max_tokens(synth: Synth) -> None:
    eos = WordTokenizer().eos_token_id
    stream = synth.client().chat.completions.create(model=NAMED, messages=ask(), max_tokens=OUTPUT_TOKENS * 3,
                                                    logit_bias={str(eos): -100}, stream=True,
                                                    stream_options={"include_usage": True})
    chunks, finish, usage = 0, None, None
    for chunk in stream:
        chunks += sum(1 for c in chunk.choices if c.delta.content)
        finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
        usage = chunk.usage or usage
    assert finish == "length" and usage is not None and usage.completion_tokens == OUTPUT_TOKENS * 3
    assert chunks > 8  # streamed as it comes, not in one piece (a client that falls behind gets merged chunks)


def test_json_schema_choice_and_a_required_tool_call(synth: Synth) -> None:
    client = synth.client()
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
              "required": ["city", "days"], "additionalProperties": False}
    out = client.chat.completions.create(model=TOKENIZED, messages=ask(), response_format={
        "type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}})
    assert json.loads(out.choices[0].message.content or "") == {"city": "synthetic", "days": 1}
    choice = client.chat.completions.create(model=NAMED, messages=ask(), temperature=0,
                                            extra_body={"structured_outputs": {"choice": ["north", "south"]}})
    assert choice.choices[0].message.content == "north"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    called = client.chat.completions.create(model=NAMED, messages=ask("Weather in Oslo?"), tools=tools,
                                            tool_choice="required")
    calls = called.choices[0].message.tool_calls or []
    assert called.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "synthetic"}


def test_a_regex_is_refused_with_a_400(synth: Synth) -> None:
    r = httpx.post(f"{synth.base}/v1/chat/completions", timeout=30, json={
        "model": NAMED, "messages": ask(), "structured_outputs": {"regex": "[a-z]+"}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "structured_outputs" and "synthetic" in error["message"]


def test_a_dropped_stream_is_cancelled_in_the_engine(synth: Synth) -> None:
    stream = synth.client().chat.completions.create(model=NAMED, messages=ask(), max_tokens=2000,
                                                    logit_bias={str(WordTokenizer().eos_token_id): -100}, stream=True)
    got = 0
    for chunk in stream:
        got += sum(1 for c in chunk.choices if c.delta.content)
        if got >= 5:
            break
    stream.close()

    def cancelled() -> list[int]:
        return [int(n) for n in re.findall(r"cancelled after (\d+) tokens", synth.words.log.read_text(errors="replace"))]

    wait_for(lambda: bool(cancelled()), 10, "the synthetic engine's cancel")
    assert cancelled()[0] < 1000  # of 2000 tokens: it stopped when the client left


def test_text_completions_echo_the_prompt(synth: Synth) -> None:
    out = synth.client().completions.create(model=NAMED, prompt="Hello wörld,", max_tokens=3, echo=True,
                                            temperature=0)
    assert out.choices[0].text == "Hello wörld,This answer comes"


def test_a_stream_interval_sends_the_first_token_then_every_fourth(synth: Synth) -> None:
    stream = synth.client().chat.completions.create(model=INTERVAL, messages=ask(), max_tokens=21, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        pieces += [c.delta.content for c in chunk.choices if c.delta.content]
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 21
    assert pieces[0] == "This"  # the first token at once
    assert "".join(pieces).split() == PASSAGE.split()[:21]
    assert 2 <= len(pieces) <= 6  # tokens 1, 5, 9, 13, 17, 21: six Deltas (fewer if the API merged some)


def test_fastchats_token_check_counts_with_each_models_tokenizer(synth: Synth) -> None:
    from worker.loading import ModelSpec, load_tokenizer

    prompt = "Does this prompt, and its answer, fit the model's context?"
    r = httpx.post(f"{synth.base}/api/v1/token_check", timeout=30, json={"prompts": [
        {"model": NAMED, "prompt": prompt, "max_tokens": 100},
        {"model": NAMED, "prompt": prompt, "max_tokens": 8190},
        {"model": TOKENIZED, "prompt": prompt, "max_tokens": 10}]})
    assert r.status_code == 200, r.text
    words, too_long, demo = r.json()["prompts"]
    assert words == {"fits": True, "tokenCount": len(WordTokenizer().encode(prompt)), "contextLength": 8192}
    assert too_long == {**words, "fits": False}
    demo_tokens = load_tokenizer(ModelSpec(path=str(DEMO_MODEL_DIR))).encode(prompt, add_special_tokens=True)
    assert demo["tokenCount"] == len(demo_tokens) != words["tokenCount"] and demo["fits"] is True
    missing = httpx.post(f"{synth.base}/api/v1/token_check", timeout=30, json={"prompts": [
        {"model": "no-such-model", "prompt": "x", "max_tokens": 1}]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    empty = httpx.post(f"{synth.base}/api/v1/token_check", timeout=30, json={"prompts": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"]


def test_a_batch_of_lines_runs_on_synthetic_workers(synth: Synth) -> None:
    import io

    client = synth.client()
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": NAMED, "max_tokens": 4 + i, "temperature": 0, "messages": ask(f"Line {i}.")}}
             for i in range(6)]
    data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    upload = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status in ("completed", "failed", "expired", "cancelled"), 120,
             "the batch's end")
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts and done.request_counts.completed == 6
    out = [json.loads(line) for line in client.files.content(done.output_file_id or "").read().decode().splitlines()]
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    for i in range(6):
        body = by_id[f"line-{i}"]
        assert body["usage"]["completion_tokens"] == 4 + i and body["choices"][0]["finish_reason"] == "length"
        assert PASSAGE.startswith(body["choices"][0]["message"]["content"])


def test_a_background_response_on_a_synthetic_worker(synth: Synth) -> None:
    client = synth.client()
    created = client.responses.create(model=NAMED, input="Say something.", temperature=0, max_output_tokens=9,
                                      background=True)
    assert created.status == "queued"
    wait_for(lambda: client.responses.retrieve(created.id).status in ("completed", "failed", "cancelled",
                                                                      "incomplete"), 60, "the response's end")
    final = client.responses.retrieve(created.id)
    assert final.status == "incomplete" and final.usage and final.usage.output_tokens == 9  # cut at max_output_tokens
    assert PASSAGE.startswith(final.output_text) and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
