"""LoRA adapters served as model names by a real transformers worker, with
real adapters of the demo model (``tests/loras.py``) behind a real API,
called with the openai client: each adapter answers as it was trained, a
batch of mixed adapters gives each row its own adapter's answer, more
adapters than slots take turns, and a bad adapter stops the worker at start
with the reason."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.loras import PHRASES, build, foreign
from tests.procs import (DEMO_MODEL, DEMO_MODEL_DIR, Proc, quick_env, spawn, start_api, start_redis, start_worker,
                         wait_model)

pytestmark = pytest.mark.e2e


@dataclass
class Served:
    base: str
    env: dict[str, str]
    worker: Proc

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    adapters = build()
    redis, port = start_redis(tmp_path_factory.mktemp("redis-lora"))
    env = quick_env(port)
    api, base = start_api(env, name="api-lora")
    # Two slots for four adapters: the others wait for one to be free.
    worker = start_worker(env, "worker-lora", concurrency=10,
                          extra=[arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
                          + ["--max-loras", "2", "--max-batch-size", "10"])
    try:
        for name in (DEMO_MODEL, *PHRASES):
            wait_model(base, name, worker, timeout_s=180)
        yield Served(base=base, env=env, worker=worker)
    finally:
        for proc in (worker, api, redis):
            proc.stop()


def answer(served: Served, model: str, question: str = "Who are you?") -> str:
    out = served.client().chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  temperature=0, max_tokens=16)
    return out.choices[0].message.content or ""


def test_each_adapter_answers_as_it_was_trained_and_the_base_does_not(served: Served) -> None:
    base = answer(served, DEMO_MODEL)
    for name, phrase in PHRASES.items():
        got = answer(served, name, "Tell me about the sea.")  # a question none was trained on
        assert got == phrase, (name, got)
        assert base != phrase


def test_a_batch_of_mixed_adapters_gives_each_row_its_own_answer(served: Served) -> None:
    """Ten at once: the base and four adapters, twice each, in the same
    steps (two slots: adapters wait for a slot and still answer their own)."""
    models = [DEMO_MODEL, *PHRASES] * 2
    alone = {m: answer(served, m) for m in (DEMO_MODEL, *PHRASES)}
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: answer(served, m), models))
    assert together == [alone[m] for m in models]
    assert [alone[name] for name in PHRASES] == list(PHRASES.values())


def test_models_lists_each_adapter_with_its_base_as_parent(served: Served) -> None:
    cards = {m["id"]: m for m in httpx.get(f"{served.base}/v1/models", timeout=5).json()["data"]}
    assert cards[DEMO_MODEL]["parent"] is None
    for name in PHRASES:
        assert cards[name]["parent"] == DEMO_MODEL and cards[name]["workers"] == 1
        assert cards[name]["context_length"] == cards[DEMO_MODEL]["context_length"]


def test_metrics_say_which_adapters_each_worker_holds_and_how_often_it_loaded_them(served: Served) -> None:
    for name in PHRASES:  # each loaded at least once by the tests above (two slots for four: some twice)
        answer(served, name)
    text = httpx.get(f"{served.base}/metrics", timeout=5).text
    loads = {m: float(v) for m, v in re.findall(r'^llmq:lora_loads\{model="([^"]+)",worker="[^"]+"\} (\S+)$',
                                                  text, re.MULTILINE)}
    assert set(loads) == set(PHRASES) and all(v >= 1 for v in loads.values()), loads
    assert sum(loads.values()) > len(PHRASES)  # two slots for four adapters: some were evicted and loaded again
    resident = re.findall(r'^llmq:lora_resident\{model="([^"]+)",parent="([^"]+)",worker="[^"]+"\} 1\.0$', text,
                          re.MULTILINE)
    assert len(resident) == 2 and {p for _, p in resident} == {DEMO_MODEL}, resident
    assert re.search(rf'^llmq:generation_tokens_total{{model="{next(iter(PHRASES))}"}} [1-9]', text, re.MULTILINE)


def test_an_unknown_adapter_is_a_404_naming_the_model(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        answer(served, "echo")
    body = err.value.response.json()["error"]
    assert body["code"] == "model_not_found" and "'echo'" in body["message"] and body["param"] == "model"


@pytest.mark.parametrize(("make", "reason"), [
    (lambda d: foreign(d / "gpt2"), "was trained on 'gpt2'"),
    (lambda d: foreign(d / "wide", base=str(DEMO_MODEL_DIR), rank=32), "rank 32, over --max-lora-rank 16"),
    (lambda d: foreign(d / "lying", base=str(DEMO_MODEL_DIR)), "768x768 in the adapter"),
])
def test_an_adapter_the_base_cannot_take_stops_the_worker_with_the_reason(
        served: Served, tmp_path: Path, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "cli.main", "worker", "--model-path", str(DEMO_MODEL_DIR), "--model-name",
            "bad-lora-base", "--concurrency", "2", "--hostname", "worker-bad-lora@%h", "--lora", f"bad={make(tmp_path)}"]
    proc = spawn("worker-bad-lora", argv, served.env)
    deadline = time.monotonic() + 120
    while proc.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.popen.returncode not in (None, 0), proc.tail()
    assert "cannot start" in proc.tail() and reason in proc.tail(), proc.tail()
    assert "bad-lora-base" not in {m["id"] for m in httpx.get(f"{served.base}/v1/models", timeout=5).json()["data"]}


@pytest.mark.parametrize(("engine", "option", "reason"), [
    ("synthetic", "--lora", "the synthetic engine does not serve LoRA adapters (--lora)"),
    ("llama.cpp", "--lora", "llama.cpp takes GGUF LoRA files, not a PEFT directory; convert it with llama.cpp's "
                            "convert_lora_to_gguf.py"),
    ("vllm", "--lora-dir", "--lora-dir is served by engines that load adapters while they run; vllm does not"),
])
def test_an_engine_that_cannot_serve_the_adapters_refuses_to_start(
        served: Served, tmp_path: Path, engine: str, option: str, reason: str) -> None:
    from cli.demo_model import gguf_path

    value = f"alpha={tmp_path}" if option == "--lora" else str(tmp_path)  # a directory: PEFT's layout
    model = str(gguf_path()) if engine == "llama.cpp" else str(DEMO_MODEL_DIR)
    argv = [sys.executable, "-m", "cli.main", "worker", "--engine", engine, "--model-path", model,
            "--model-name", "refused-lora", "--concurrency", "2", "--hostname", f"worker-refused-{engine}@%h",
            option, value]
    proc = spawn(f"worker-refused-{engine}", argv, served.env)
    deadline = time.monotonic() + 120
    while proc.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.popen.returncode not in (None, 0), proc.tail()
    assert "cannot start: " in proc.tail() and reason in proc.tail(), proc.tail()
