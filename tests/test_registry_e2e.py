"""The registry is worker heartbeats: a model is listed while a worker for it
lives, drops out within the heartbeat TTL when its last worker dies, and then
answers 503 (known, no live worker) rather than 404."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import HEARTBEAT_TTL_S, Stack
from tests.procs import served_models, start_worker, wait_for, wait_model

pytestmark = pytest.mark.e2e

ALIAS = "smollm2-alias"


def test_dead_worker_drops_out_within_ttl_then_503(stack: Stack) -> None:
    worker = start_worker(stack.env, "worker-alias", model_names=ALIAS, concurrency=2)
    try:
        wait_model(stack.base_url, ALIAS, worker)
        cards = {m["id"]: m for m in httpx.get(f"{stack.v1}/models").json()["data"]}
        assert cards[ALIAS]["workers"] == 1 and cards[ALIAS]["context_length"] == 8192
        client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.usage.completion_tokens == 2
    finally:
        worker.kill()  # SIGKILL: no clean withdrawal, only the TTL can remove it
    killed = time.monotonic()
    wait_for(lambda: ALIAS not in served_models(stack.base_url), HEARTBEAT_TTL_S + 3, "alias to drop out")
    gone_after = time.monotonic() - killed
    print(f"killed worker left /v1/models after {gone_after:.2f} s (TTL {HEARTBEAT_TTL_S} s)")
    assert gone_after <= HEARTBEAT_TTL_S + 1.0
    assert stack.model in served_models(stack.base_url)

    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 503
    assert err.value.code == "no_live_worker"


def test_clean_stop_withdraws_at_once(stack: Stack) -> None:
    worker = start_worker(stack.env, "worker-alias2", model_names=ALIAS + "2", concurrency=2)
    wait_model(stack.base_url, ALIAS + "2", worker)
    worker.stop()  # SIGTERM: Celery's warm shutdown runs the bootstep's stop
    assert worker.popen.returncode == 0, worker.tail()
    assert ALIAS + "2" not in served_models(stack.base_url)


def test_bad_model_path_fails_at_start_with_one_line(stack: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker(stack.env, "worker-bad", model_names="never-served",
                          extra=["--model-path", str(tmp_path / "nothing-here")])
    # start_worker passes the demo path first; a second, missing one must stop the worker
    worker.popen.wait(timeout=120)
    lines = [ln for ln in worker.log.read_text().splitlines() if "llmq worker: cannot start" in ln]
    print(lines)
    assert worker.popen.returncode != 0
    assert lines == [f"llmq worker: cannot start: --model-path {tmp_path / 'nothing-here'}: no such directory"]
    assert "never-served" not in served_models(stack.base_url)
