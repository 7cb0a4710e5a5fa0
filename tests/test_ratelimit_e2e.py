"""Limits per named API key (api/keys.py), against two real API processes
sharing one Redis: the budget is one, whichever process answers; every
answer carries OpenAI's x-ratelimit-* headers; over a limit it is a 429
``rate_limit_exceeded``; logs and /metrics name the key, never the key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.procs import start_api

SECRET_A = "sk-team-a-5ecret-never-logged"
SECRET_B = "sk-team-b-5ecret-never-logged"
SECRET_FREE = "sk-free-5ecret-never-logged"
KEYS_TOML = f"""
[keys.team-a]
key = "{SECRET_A}"
requests_per_minute = 3

[keys.team-b]
key = "{SECRET_B}"
tokens_per_minute = 40

[keys.free]
key = "{SECRET_FREE}"
"""


@pytest.fixture(scope="module")
def apis(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, Path]]]:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(KEYS_TOML)
    env = {**stack.env, "LLMQ_API_KEYS_FILE": str(path)}
    started = [start_api(env, name=f"api-limits-{i}", log_level="info") for i in range(2)]
    try:
        yield [(base, proc.log) for proc, base in started]
    finally:
        for proc, _ in started:
            proc.stop()


def _fresh_window() -> None:
    """Limits count per clock minute: start a test well inside one."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def chat(base: str, key: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "temperature": 0,
                            "messages": [{"role": "user", "content": "Hi"}]})


def test_requests_per_minute_across_api_processes(apis: list[tuple[str, Path]]) -> None:
    _fresh_window()
    answers = [chat(apis[i % 2][0], SECRET_A) for i in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0", "0"]
    for r in answers:
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        reset = r.headers["x-ratelimit-reset-requests"]
        assert reset.endswith("s") and 0 < int(reset[:-1]) <= 60
    err = answers[3].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests" and "team-a" in err["message"]
    assert SECRET_A not in answers[3].text
    assert int(answers[3].headers["retry-after"]) >= 1
    # Another key has its own budget, and a key without limits gets no headers.
    free = chat(apis[0][0], SECRET_FREE)
    assert free.status_code == 200 and "x-ratelimit-limit-requests" not in free.headers


def test_tokens_per_minute_and_streams_carry_headers(apis: list[tuple[str, Path]]) -> None:
    _fresh_window()
    base = apis[0][0]
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {SECRET_B}"},
                      json={"model": "smollm2-135m-instruct", "max_tokens": 30, "temperature": 0, "stream": True,
                            "messages": [{"role": "user", "content": "Tell me a story."}]}) as first:
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "40"
        first.read()
    # The stream's prompt and completion tokens (well over 40) count once it ended.
    second = chat(apis[1][0], SECRET_B)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "tokens"
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"


def test_logs_and_metrics_name_the_key_never_the_secret(apis: list[tuple[str, Path]]) -> None:
    _fresh_window()
    assert chat(apis[0][0], SECRET_FREE).status_code == 200
    metrics = httpx.get(f"{apis[0][0]}/metrics", timeout=10).text
    assert 'llmq:api_key_requests_total{key_name="free",outcome="admitted"}' in metrics
    assert 'llmq:api_key_tokens_total{key_name="free"}' in metrics
    logs = "".join(path.read_text(errors="replace") for _, path in apis)
    assert "key=free" in logs
    for secret in (SECRET_A, SECRET_B, SECRET_FREE):
        assert secret not in metrics and secret not in logs
