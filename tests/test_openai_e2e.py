"""The official openai client against a real stack: Redis, API, Celery worker
with SmolLM2-135M-Instruct."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import Stack
from tests.procs import DEMO_MODEL_DIR

pytestmark = pytest.mark.e2e

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def chat_prompt_tokens(tokenizer, messages) -> int:  # type: ignore[no-untyped-def]
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def test_models_lists_exactly_the_live_model(client: openai.OpenAI, stack: Stack) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [stack.model]


def test_chat_answers_paris_with_usage(client: openai.OpenAI, stack: Stack, tokenizer) -> None:  # type: ignore[no-untyped-def]
    r = client.chat.completions.create(model=stack.model, messages=PARIS, temperature=0)
    text = r.choices[0].message.content
    print("chat answer:", repr(text), r.usage)
    assert "Paris" in text
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == chat_prompt_tokens(tokenizer, PARIS)
    # the answer's tokens plus the end-of-turn token the model stopped on
    assert r.usage.completion_tokens == len(tokenizer.encode(text)) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.model == stack.model


def test_chat_stream_equals_non_stream(client: openai.OpenAI, stack: Stack) -> None:
    whole = client.chat.completions.create(model=stack.model, messages=PARIS, temperature=0)
    chunks = list(client.chat.completions.create(
        model=stack.model, messages=PARIS, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_chat_max_tokens_gives_length(client: openai.OpenAI, stack: Stack) -> None:
    for extra in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        r = client.chat.completions.create(model=stack.model, messages=PARIS, temperature=0, **extra)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3


def test_chat_stream_at_max_tokens(client: openai.OpenAI, stack: Stack) -> None:
    chunks = list(client.chat.completions.create(
        model=stack.model, messages=PARIS, temperature=0, max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    ))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 4


def test_completion_non_stream_and_stream(client: openai.OpenAI, stack: Stack, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = "The capital of France is"
    r = client.completions.create(model=stack.model, prompt=prompt, temperature=0, max_tokens=5)
    print("completion:", repr(r.choices[0].text), r.usage)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 5
    chunks = list(client.completions.create(
        model=stack.model, prompt=prompt, temperature=0, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage == r.usage


def test_completion_accepts_token_ids(client: openai.OpenAI, stack: Stack, tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("The capital of France is")
    by_ids = client.completions.create(model=stack.model, prompt=ids, temperature=0, max_tokens=5)
    by_text = client.completions.create(model=stack.model, prompt="The capital of France is", temperature=0,
                                        max_tokens=5)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completion_stops_at_eos(client: openai.OpenAI, stack: Stack, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt = tokenizer.apply_chat_template(PARIS, add_generation_prompt=True, tokenize=False)
    r = client.completions.create(model=stack.model, prompt=prompt, temperature=0, max_tokens=64)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 64


# ------------------------------------------------------------------ errors


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=PARIS)
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found" and err.value.param == "model"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 17}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"hello": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]},
         "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"extra_body": {"structured_outputs": {"regex": "(?<=a)b"}}}, "structured_outputs"),
        ({"extra_body": {"temprature": 1}}, "temprature"),
    ],
)
def test_bad_parameters_are_400_naming_them(client: openai.OpenAI, stack: Stack, extra, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=stack.model, messages=PARIS, **extra)
    assert err.value.status_code == 400
    assert err.value.param == param, err.value.body
    assert param in err.value.message


def test_bad_message_role_is_400(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=stack.model, messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.param == "messages.0.role"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_400_before_any_stream(client: openai.OpenAI, stack: Stack, stream: bool) -> None:
    long = [{"role": "user", "content": "lighthouse " * 9000}]  # > 8192 tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=stack.model, messages=long, stream=stream)
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
    assert "8192" in err.value.message


def test_max_tokens_beyond_context_is_400(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=stack.model, messages=PARIS, max_tokens=8190)
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
