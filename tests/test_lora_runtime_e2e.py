"""LoRA adapters that come and go while a real worker runs, with real
adapters of the demo model (``tests/loras.py``): those of its ``--lora-dir``,
found as they appear and read on first use, and those loaded and unloaded
through the API's admin routes (``api/admin.py``), each checked by a worker
before it is listed, with the reason when the base cannot take it."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.loras import PHRASES, build, foreign
from tests.procs import (DEMO_MODEL, DEMO_MODEL_DIR, Proc, quick_env, served_models, start_api, start_redis,
                         start_worker, wait_for, wait_model)

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-secret-for-tests"


@dataclass
class Stack:
    base: str
    worker: Proc
    lora_dir: Path
    adapters: dict[str, Path]

    def answer(self, model: str) -> str:
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                             temperature=0, max_tokens=16)
        return out.choices[0].message.content or ""

    def admin(self, route: str, body: dict[str, object], key: str | None = ADMIN_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.post(f"{self.base}/v1/{route}", json=body, headers=headers, timeout=60)

    def cards(self) -> dict[str, dict[str, object]]:
        return {m["id"]: m for m in httpx.get(f"{self.base}/v1/models", timeout=5).json()["data"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    adapters = build()
    lora_dir = tmp_path_factory.mktemp("lora-dir")
    shutil.copytree(adapters["charlie"], lora_dir / "charlie")
    redis, port = start_redis(tmp_path_factory.mktemp("redis-lora-runtime"))
    env = quick_env(port, LLMQ_ADMIN_KEY=ADMIN_KEY)
    api, base = start_api(env, name="api-lora-runtime")
    worker = start_worker(env, "worker-lora-runtime", concurrency=4,
                          extra=["--lora-dir", str(lora_dir), "--max-loras", "2", "--max-batch-size", "4"])
    try:
        wait_model(base, "charlie", worker, timeout_s=180)
        yield Stack(base=base, worker=worker, lora_dir=lora_dir, adapters=adapters)
    finally:
        for proc in (worker, api, redis):
            proc.stop()


def test_the_lora_dir_serves_each_adapter_in_it_even_one_that_appears_or_leaves_later(stack: Stack) -> None:
    assert stack.cards()["charlie"]["parent"] == DEMO_MODEL
    assert stack.answer("charlie") == PHRASES["charlie"]
    shutil.copytree(stack.adapters["delta"], stack.lora_dir / "delta")
    wait_model(stack.base, "delta", stack.worker, timeout_s=10)  # the worker's next heartbeat
    assert stack.answer("delta") == PHRASES["delta"]
    shutil.rmtree(stack.lora_dir / "delta")
    wait_for(lambda: "delta" not in served_models(stack.base), 10, "delta no longer served", stack.worker)
    with pytest.raises(openai.NotFoundError):
        stack.answer("delta")


def test_admin_routes_need_the_admin_key(stack: Stack) -> None:
    body = {"lora_name": "alpha", "lora_path": str(stack.adapters["alpha"])}
    for key in (None, "wrong"):
        r = stack.admin("load_lora_adapter", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key", r.text
    assert "alpha" not in stack.cards()


def test_an_adapter_loaded_through_the_api_is_served_until_it_is_unloaded(stack: Stack) -> None:
    r = stack.admin("load_lora_adapter", {"lora_name": "alpha", "lora_path": str(stack.adapters["alpha"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' added successfully.", r.text
    card = stack.cards()["alpha"]  # listed when the route answers
    assert card["parent"] == DEMO_MODEL and card["workers"] == 1
    assert stack.answer("alpha") == PHRASES["alpha"]
    again = stack.admin("load_lora_adapter", {"lora_name": "alpha", "lora_path": str(stack.adapters["bravo"])})
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists", again.text

    r = stack.admin("unload_lora_adapter", {"lora_name": "alpha"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' removed successfully.", r.text
    assert "alpha" not in stack.cards()
    with pytest.raises(openai.NotFoundError) as err:
        stack.answer("alpha")
    assert err.value.response.json()["error"]["code"] == "model_not_found"
    gone = stack.admin("unload_lora_adapter", {"lora_name": "alpha"})
    assert gone.status_code == 404, gone.text
    from_dir = stack.admin("unload_lora_adapter", {"lora_name": "charlie"})
    assert from_dir.status_code == 400 and "--lora-dir" in from_dir.json()["error"]["message"], from_dir.text


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: foreign(d / "gpt2"), "was trained on 'gpt2'"),
    (lambda d: foreign(d / "wide", base=str(DEMO_MODEL_DIR), rank=32), "rank 32, over --max-lora-rank 16"),
    (lambda d: foreign(d / "lying", base=str(DEMO_MODEL_DIR)), "768x768 in the adapter"),
    (lambda d: d / "nothing-here", "no adapter_config.json"),
])
def test_a_load_the_base_cannot_take_is_a_400_with_the_reason(stack: Stack, tmp_path: Path, make,  # type: ignore[no-untyped-def]
                                                               reason: str) -> None:
    r = stack.admin("load_lora_adapter", {"lora_name": "bad", "lora_path": str(make(tmp_path))})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_adapter" and reason in error["message"], r.text
    assert error["param"] == "lora_path"
    time.sleep(1.0)  # two heartbeats: a refused adapter is never announced
    assert "bad" not in stack.cards()


def test_bad_load_requests_are_400s_naming_the_field(stack: Stack) -> None:
    taken = stack.admin("load_lora_adapter", {"lora_name": DEMO_MODEL, "lora_path": str(stack.adapters["alpha"])})
    assert taken.status_code == 400 and taken.json()["error"]["code"] == "adapter_exists", taken.text
    bad_name = stack.admin("load_lora_adapter", {"lora_name": "a b", "lora_path": str(stack.adapters["alpha"])})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] in ("lora_name", "body.lora_name")
    base = stack.admin("load_lora_adapter", {"lora_name": "x", "lora_path": "/x", "base_model": "no-such-model"})
    assert base.status_code == 404 and base.json()["error"]["code"] == "model_not_found", base.text
