"""SSE framing byte for byte, with plain httpx: what a client without the
openai SDK sees."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.e2e


def read_events(stack: Stack, path: str, body: dict) -> tuple[httpx.Response, list[str]]:  # type: ignore[type-arg]
    with httpx.stream("POST", f"{stack.v1}/{path}", json=body, timeout=120) as r:
        raw = b"".join(r.iter_bytes()).decode()
    # OpenAI frames each event as "data: <payload>\n\n"; keep-alive comments
    # (": ping") are allowed by SSE and ignored by clients.
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    frames = [f for f in raw.split("\n\n") if f and not f.startswith(":")]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    return r, [f.removeprefix("data: ") for f in frames]


def test_chat_stream_framing(stack: Stack) -> None:
    r, payloads = read_events(stack, "chat/completions", {
        "model": stack.model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    })
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == r.headers["x-request-id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-2]
    assert content and all(set(c["choices"][0]["delta"]) == {"content"} for c in content)
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    print("chat stream:", len(chunks), "chunks,", "".join(c["choices"][0]["delta"]["content"] for c in content))


def test_stream_without_usage_has_no_usage_chunk(stack: Stack) -> None:
    _, payloads = read_events(stack, "completions", {
        "model": stack.model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True,
    })
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_error_before_stream_is_plain_json(stack: Stack) -> None:
    r = httpx.post(f"{stack.v1}/chat/completions", timeout=30, json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "stream": True,
    })
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_json_is_400(stack: Stack) -> None:
    r = httpx.post(f"{stack.v1}/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
