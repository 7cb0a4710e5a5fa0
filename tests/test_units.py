"""Pure units: detokenizer, sampling processor, request validation, worker
options, Redis names. No services."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from api.errors import APIError
from api.protocol import ChatCompletionRequest, CompletionRequest
from broker.keys import Keys, queue_name
from broker.schemas import Delta, parse_event
from tests.procs import DEMO_MODEL_DIR
from worker.bootstep import specs_from_options
from worker.detok import IncrementalDetokenizer
from worker.loading import ModelLoadError, ModelSpec, load
from worker.sampling import GreedyAwareTemperature


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    if not (DEMO_MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip(f"{DEMO_MODEL_DIR} not built (make test builds it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.mark.parametrize("text", [
    "Hello, world! The capital of France is Paris.",
    "Emoji 🦙🚀 and accents: café, naïve, Ærøskøbing; CJK: 北京是中国的首都。",
    "  leading spaces\n\nand\ttabs  ",
])
def test_detokenizer_one_token_at_a_time_is_exact(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # multi-byte characters never split


def test_detokenizer_decodes_a_window_not_the_whole_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = tokenizer.decode

    class Counting:
        def decode(self, ids, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(ids))
            return real(ids, **kw)

    detok = IncrementalDetokenizer(Counting(), [])
    for i in tokenizer.encode("word " * 300):
        detok.push([i])
    assert max(calls) <= 12, max(calls)


def test_temperature_zero_rows_become_one_hot_and_others_scale() -> None:
    proc = GreedyAwareTemperature.__new__(GreedyAwareTemperature)
    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    temps = torch.tensor([0.0, 2.0], dtype=torch.float32).view(torch.int32)
    out = proc(scores, temps)
    assert torch.isinf(out[0, 0]) and out[0, 1] == 0 and torch.isinf(out[0, 2])
    assert torch.allclose(out[1], torch.tensor([0.5, 1.5, 1.0]))


def test_chat_request_validation() -> None:
    ok = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}]}
    )
    assert ok.messages[0].to_message().model_dump() == {"role": "system", "content": "be brief"}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(APIError) as err:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "logprobs": True})
    assert err.value.param == "logprobs" and err.value.status == 400
    with pytest.raises(APIError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "stream_options": {"include_usage": True}})
    # neutral values of refused options are fine: clients send them by default
    ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                          "presence_penalty": 0, "frequency_penalty": 0, "stop": None})


def test_completion_prompt_forms() -> None:
    assert CompletionRequest(model="m", prompt="hi").single_prompt() == "hi"
    assert CompletionRequest(model="m", prompt=["hi"]).single_prompt() == "hi"
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).single_prompt() == [1, 2, 3]
    with pytest.raises(APIError):
        CompletionRequest(model="m", prompt=["a", "b"]).single_prompt()
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16  # OpenAI's default


def test_worker_options_to_specs() -> None:
    specs = specs_from_options({"model_path": ("/m/a", "/m/B.gguf"), "model_name": ("a1,a2",), "dtype": "auto"})
    assert specs[0].served_names() == ("a1", "a2") and specs[1].served_names() == ("b",)
    with pytest.raises(ModelLoadError):
        specs_from_options({"model_path": ()})
    with pytest.raises(ModelLoadError):
        specs_from_options({"model_path": ("/m/a", "/n/a")})  # both would be served as "a"


def test_bad_model_paths_fail_with_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for path in (str(tmp_path / "missing.gguf"), str(tmp_path)):
        with pytest.raises(ModelLoadError) as err:
            load(ModelSpec(path=path))
        assert "\n" not in str(err.value) and path in str(err.value)


def test_names_live_in_one_place() -> None:
    k = Keys("llmq:")
    assert k.worker("w1") == "llmq:worker:w1" and k.claim("j") == "llmq:job:j:claim"
    assert queue_name("smol") == "llmq.smol"
    ev = parse_event(Delta(job_id="j", seq=3, text="é", completion_tokens=4).model_dump_json())
    assert isinstance(ev, Delta) and ev.text == "é"
