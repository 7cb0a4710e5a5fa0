"""API keys on every /v1 route, and the health probes."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.procs import start_api

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def keyed_api(stack: Stack):  # type: ignore[no-untyped-def]
    proc, base = start_api({**stack.env, "LLMQ_API_KEYS": "key-one, key-two"}, name="api-keys")
    yield base
    proc.stop()


def test_keys_required_on_every_v1_route(stack: Stack, keyed_api: str) -> None:
    routes = [("GET", "/v1/models", None),
              ("POST", "/v1/chat/completions", {"model": stack.model, "messages": [{"role": "user", "content": "hi"}]}),
              ("POST", "/v1/completions", {"model": stack.model, "prompt": "hi"}),
              ("POST", "/v1/embeddings", {"model": "any", "input": "hi"})]
    for method, path, body in routes:
        for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer nope"}, "invalid_api_key"),
                              ({"Authorization": "Basic key-one"}, "missing_api_key")):
            r = httpx.request(method, keyed_api + path, json=body, headers=headers)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == code and r.json()["error"]["type"] == "invalid_request_error"
    for key in ("key-one", "key-two"):
        client = openai.OpenAI(base_url=f"{keyed_api}/v1", api_key=key, max_retries=0)
        assert stack.model in [m.id for m in client.models.list().data]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_api}/v1", api_key="key-three", max_retries=0).models.list()


def test_health_and_ready(stack: Stack, keyed_api: str) -> None:
    assert httpx.get(f"{keyed_api}/health").json() == {"status": "ok"}  # probes need no key
    ready = httpx.get(f"{keyed_api}/ready")
    assert ready.status_code == 200 and stack.model in ready.json()["models"]
    # an API whose prefix no worker uses sees no live worker: not ready
    proc, base = start_api({**stack.env, "LLMQ_KEY_PREFIX": "empty:"}, name="api-empty")
    try:
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 503 and r.json()["reason"] == "no live worker"
        assert httpx.get(f"{base}/health").status_code == 200
    finally:
        proc.stop()
