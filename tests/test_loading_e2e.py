"""Worker model options through real workers: 8-bit and 4-bit weights
(bitsandbytes runs on CPU), several models in one worker each with its own
queue and engine, --chat-template and --context-length."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import Stack
from tests.procs import DEMO_MODEL_DIR, Proc, start_worker, wait_model

pytestmark = pytest.mark.e2e

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
BARE_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def quantized_workers(stack: Stack, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    template = tmp_path_factory.mktemp("tpl") / "bare.jinja"
    template.write_text(BARE_TEMPLATE)
    w8 = start_worker(stack.env, "worker-8bit", model_names="q8-a", concurrency=4, extra=[
        "--load-8bit", "--model-path", str(DEMO_MODEL_DIR), "--model-name", "q8-b",
        "--chat-template", str(template), "--context-length", "256",
    ])
    w4 = start_worker(stack.env, "worker-4bit", model_names="q4", concurrency=4, extra=["--load-4bit"])
    try:
        for name, proc in (("q8-a", w8), ("q8-b", w8), ("q4", w4)):
            wait_model(stack.base_url, name, proc, timeout_s=180)
        yield w8, w4
    finally:
        w8.stop()
        w4.stop()


def test_4bit_worker_answers(stack: Stack, quantized_workers: tuple[Proc, Proc]) -> None:
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="q4", messages=PARIS, temperature=0, max_tokens=16)
    print("4-bit:", repr(r.choices[0].message.content))
    assert "Paris" in r.choices[0].message.content
    assert "4-bit" in quantized_workers[1].log.read_text()


def test_8bit_worker_serves_two_models_with_own_queues(stack: Stack, quantized_workers: tuple[Proc, Proc]) -> None:
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=120)
    for name in ("q8-a", "q8-b"):
        r = client.completions.create(model=name, prompt="The capital of France is", temperature=0, max_tokens=6)
        print(f"8-bit {name}:", repr(r.choices[0].text))
        assert "Paris" in r.choices[0].text
    log = quantized_workers[0].log.read_text()
    assert "as q8-a on cpu (8-bit" in log and "as q8-b on cpu (8-bit" in log  # one engine per model
    assert ".> llmq.q8-a" in log and ".> llmq.q8-b" in log  # and one queue each
    cards = {m["id"]: m for m in httpx.get(f"{stack.v1}/models").json()["data"]}
    assert cards["q8-a"]["context_length"] == cards["q8-b"]["context_length"] == 256


def test_chat_template_file_and_context_length(stack: Stack, quantized_workers: tuple[Proc, Proc]) -> None:
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=120)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    content = "Tell me about lighthouses."
    r = client.chat.completions.create(model="q8-a", messages=[{"role": "user", "content": content}], max_tokens=2)
    assert r.usage.prompt_tokens == len(tok.encode(content))  # the bare template: just the content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="q8-a", messages=[{"role": "user", "content": "word " * 300}])
    assert err.value.code == "context_length_exceeded" and "256" in err.value.message
