"""Bad input against the real stack: each kind gets a 4xx in OpenAI's error
shape that names the problem, never a 500, and the worker keeps serving.

(A chat ``max_tokens`` beyond the context is in test_openai_e2e.py,
``test_max_tokens_beyond_context_is_400``; here is the completions variant.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.settings import Settings
from tests.conftest import Stack

pytestmark = pytest.mark.e2e

LIMITS = Settings()  # the stack runs with the defaults
HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.v1, timeout=120) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error", error
    return error  # type: ignore[no-any-return]


# ------------------------------------------------------------------ size


def oversized(stack: Stack) -> bytes:
    pad = "x" * (LIMITS.max_body_bytes + 1)
    return json.dumps({"model": stack.model, "messages": HI, "user": pad}).encode()


def test_body_over_the_limit_is_413_by_content_length(client: httpx.Client, stack: Stack) -> None:
    r = client.post("/chat/completions", content=oversized(stack), headers=JSON)
    error = error_of(r, 413)
    assert error["code"] == "request_too_large"
    assert str(LIMITS.max_body_bytes) in error["message"]


def test_chunked_body_over_the_limit_is_413(client: httpx.Client, stack: Stack) -> None:
    body = oversized(stack)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    r = client.post("/chat/completions", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    error = error_of(r, 413)
    assert error["code"] == "request_too_large"
    assert str(LIMITS.max_body_bytes) in error["message"]


def test_bodies_within_the_limit_pass_chunked_or_not(client: httpx.Client, stack: Stack) -> None:
    # Just under the limit, with an unknown model so nothing is generated: the
    # body was read and parsed whole, or the 404 could not name the model.
    pad = "x" * (LIMITS.max_body_bytes - 1024)
    big = json.dumps({"model": "no-such-model", "messages": HI, "user": pad}).encode()
    assert len(big) <= LIMITS.max_body_bytes
    r = client.post("/chat/completions", content=big, headers=JSON)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    small = json.dumps({"model": stack.model, "messages": HI, "max_tokens": 2, "temperature": 0}).encode()
    r = client.post("/chat/completions", content=iter([small[:10], small[10:]]), headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


# ------------------------------------------------------------------ messages


def test_too_many_messages_is_400(client: httpx.Client, stack: Stack) -> None:
    many = HI * (LIMITS.max_messages + 1)
    error = error_of(client.post("/chat/completions", json={"model": stack.model, "messages": many}), 400)
    assert error["param"] == "messages"
    assert str(LIMITS.max_messages) in error["message"] and str(len(many)) in error["message"]
    # At the limit the request passes the check (and meets the unknown model).
    r = client.post("/chat/completions", json={"model": "no-such-model", "messages": HI * LIMITS.max_messages})
    assert r.status_code == 404, r.text


@pytest.mark.parametrize("role", ["function", "wizard", ""])
def test_unknown_role_is_400_naming_the_message(client: httpx.Client, stack: Stack, role: str) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": role, "content": "hi"}]
    error = error_of(client.post("/chat/completions", json={"model": stack.model, "messages": messages}), 400)
    assert error["param"] == "messages.1.role"
    assert "'messages.1.role'" in error["message"] and "'user'" in error["message"]


def test_tool_message_without_its_call_id_is_400(client: httpx.Client, stack: Stack) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "sunny"}]
    error = error_of(client.post("/chat/completions", json={"model": stack.model, "messages": messages}), 400)
    assert error["param"] == "messages.1.tool_call_id"


# ------------------------------------------------------------------ types


@pytest.mark.parametrize(
    ("route", "change", "param"),
    [
        ("chat/completions", {"messages": "hi"}, "messages"),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]},
         "messages.0.content.0.type"),
        ("chat/completions", {"messages": ["hi"]}, "messages.0"),
        ("chat/completions", {"model": 7}, "model"),
        ("chat/completions", {"temperature": "hot"}, "temperature"),
        ("chat/completions", {"n": 1.5}, "n"),
        ("chat/completions", {"stream": "sometimes"}, "stream"),
        ("chat/completions", {"stop": 3}, "stop"),
        ("chat/completions", {"logit_bias": [1, 2]}, "logit_bias"),
        ("completions", {"prompt": {"text": "hi"}}, "prompt"),
        ("completions", {"max_tokens": "lots"}, "max_tokens"),
        ("completions", {"echo": [True]}, "echo"),
        ("embeddings", {"input": 5}, "input"),
        ("embeddings", {"encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_wrong_types_are_400_naming_the_field(client: httpx.Client, stack: Stack, route: str,
                                              change: dict[str, Any], param: str) -> None:
    base: dict[str, Any] = {"model": stack.model}
    base |= {"chat/completions": {"messages": HI}, "completions": {"prompt": "hi"}, "embeddings": {"input": "hi"}}[route]
    error = error_of(client.post(f"/{route}", json=base | change), 400)
    assert error["param"] == param, error
    assert f"'{param}'" in error["message"], error


@pytest.mark.parametrize("body", [b"[1, 2]", b'"hi"', b"null", b"42"])
def test_a_body_that_is_not_an_object_is_400(client: httpx.Client, body: bytes) -> None:
    error = error_of(client.post("/chat/completions", content=body, headers=JSON), 400)
    assert "dictionary or object" in error["message"]


# ------------------------------------------------------------------ encoding


def test_invalid_json_is_400(client: httpx.Client, stack: Stack) -> None:
    body = b'{"model": "%s", "messages": [' % stack.model.encode()
    error = error_of(client.post("/chat/completions", content=body, headers=JSON), 400)
    assert "JSON" in error["message"] and error["param"] is None


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"])
def test_invalid_utf8_is_400(client: httpx.Client, stack: Stack, bad: bytes) -> None:
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi %s"}]}' % (stack.model.encode(), bad)
    error = error_of(client.post("/chat/completions", content=body, headers=JSON), 400)
    assert "UTF-8" in error["message"], error


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
         "messages.0.content"),
        ("completions", '{"model": "M", "prompt": "hi \\udc80", "max_tokens": 2}', "prompt"),
        ("completions", '{"model": "\\udfff", "prompt": "hi"}', "model"),
        ("embeddings", '{"model": "M", "input": ["ok", "\\ud83d"]}', "input.1"),
    ],
)
def test_lone_surrogate_escape_is_400(client: httpx.Client, stack: Stack, route: str, body: str, param: str) -> None:
    # Valid JSON and valid UTF-8, yet not Unicode text: the tokenizer, Redis and
    # the JSON encoder all refuse it. Before the fix, a completion prompt like
    # this made the worker's task raise and the request hang for 10 minutes.
    content = body.replace('"M"', json.dumps(stack.model)).encode()
    error = error_of(client.post(f"/{route}", content=content, headers=JSON), 400)
    assert error["param"] == param and "surrogate" in error["message"], error


def test_json_nested_too_deep_is_400(client: httpx.Client) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    error = error_of(client.post("/chat/completions", content=body, headers=JSON), 400)
    assert "nested too deeply" in error["message"]


# ------------------------------------------------------------------ values the engine cannot take


def test_completion_max_tokens_beyond_context_is_400(client: httpx.Client, stack: Stack) -> None:
    r = client.post("/completions", json={"model": stack.model, "prompt": "hi", "max_tokens": 8192})
    error = error_of(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "8192" in error["message"]


@pytest.mark.parametrize("prompt", ["", [""], [[]]])
def test_empty_prompt_is_400(client: httpx.Client, stack: Stack, prompt: Any) -> None:
    # Found by schemathesis: "" reached the engine as zero tokens, failed with
    # a 500 and left the worker's generation loop dead.
    error = error_of(client.post("/completions", json={"model": stack.model, "prompt": prompt, "max_tokens": 2}), 400)
    assert error["param"] == "prompt" and "empty" in error["message"]


def test_tiny_temperature_is_greedy_and_the_worker_keeps_serving(client: httpx.Client, stack: Stack) -> None:
    # 1e-300 is 0 in float32: the sampler divided by zero, answered 500 and
    # left the worker's generation loop dead for every later request.
    def answer(temperature: float) -> str:
        r = client.post("/completions", json={"model": stack.model, "prompt": "The capital of France is",
                                              "max_tokens": 3, "temperature": temperature})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]  # type: ignore[no-any-return]

    assert answer(1e-300) == answer(5e-324) == answer(0.0)
