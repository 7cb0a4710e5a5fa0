"""Pure units: detokenizer, sampling processor, request validation, worker
options, Redis names, the hang-up watch. No services."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from api.errors import APIError
from api.jobs.hangup import CancelOnHangUp
from api.completions.protocol import ChatCompletionRequest, CompletionRequest
from broker.keys import Keys, queue_name
from broker.schemas import Delta, parse_event
from tests.procs import DEMO_MODEL_DIR
from worker.bootstep import specs_from_options
from worker.engines.registry import kind_of
from worker.engines.transformers.detok import IncrementalDetokenizer
from worker.loading import ModelLoadError, ModelSpec, load
from broker.schemas import Sampling
from worker.engines.transformers.sampler import Sampler
from worker.engines.transformers.stops import StopStrings


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


def test_sampler_is_greedy_at_temperature_zero_and_draws_otherwise() -> None:
    sampler = Sampler(vocab_size=5)
    greedy = sampler.open(Sampling(temperature=0), seed=None)
    hot = sampler.open(Sampling(temperature=1.0), seed=3)
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 9.0]])
    assert sampler.sample(scores, [greedy, hot]) == [1, 4]  # 9 nats ahead: the draw is all but certain


def test_sampler_seed_reproduces_and_penalties_and_bias_apply() -> None:
    scores = torch.zeros(1, 50)

    def draw(seed: int) -> list[int]:
        sampler = Sampler(vocab_size=50)
        slot = sampler.open(Sampling(temperature=1.0), seed=seed)
        return [sampler.sample(scores, [slot])[0] for _ in range(20)]

    assert draw(5) == draw(5) and draw(5) != draw(6)
    sampler = Sampler(vocab_size=4)
    slot = sampler.open(Sampling(temperature=0, frequency_penalty=2.0), seed=None)
    flat = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    picks = [sampler.sample(flat, [slot])[0] for _ in range(3)]
    assert picks == [0, 1, 2]  # each used token drops by 2: 1 -> -1, 0.5 -> -1.5, then 0 wins
    biased = sampler.open(Sampling(temperature=0, logit_bias={3: 5.0}), seed=None)
    assert sampler.sample(flat, [biased]) == [3]


def test_sampler_batch_equals_each_row_alone() -> None:
    """One call over a mixed batch picks what each row would pick on its own:
    seeded rows draw from their own generator, penalties count their own output."""
    options = [Sampling(temperature=0), Sampling(temperature=0.8, seed=1), Sampling(temperature=1.0, top_k=3, seed=2),
               Sampling(temperature=1.2, top_p=0.5, seed=3), Sampling(temperature=0, presence_penalty=1.5),
               Sampling(temperature=0.7, frequency_penalty=0.5, logit_bias={7: 3.0}, seed=4)]
    torch.manual_seed(0)
    steps = [torch.randn(len(options), 40) for _ in range(12)]

    def run(rows: list[int]) -> list[list[int]]:
        sampler = Sampler(vocab_size=40)
        slots = [sampler.open(options[i], seed=options[i].seed) for i in rows]
        return [sampler.sample(logits[rows], slots) for logits in steps]

    together = run(list(range(len(options))))
    for i in range(len(options)):
        assert [step[i] for step in together] == [step[0] for step in run([i])], options[i]


def test_sampler_logprobs_come_from_the_raw_distribution() -> None:
    sampler = Sampler(vocab_size=3)
    slot = sampler.open(Sampling(temperature=0, logprobs=2, presence_penalty=2.0), seed=None)
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    sampler.sample(scores, [slot])
    pick = slot.take(1)[0]
    expected = torch.log_softmax(scores[0], -1)
    assert pick.token == 0 and pick.logprob == pytest.approx(float(expected[0]))
    assert [t for t, _ in pick.top] == [0, 1]


def test_top_p_and_top_k_restrict_the_choice() -> None:
    scores = torch.tensor([[5.0, 4.9, 0.0, 0.0]])
    for sampling in (Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=0.01)):
        sampler = Sampler(vocab_size=4)
        slot = sampler.open(sampling, seed=1)
        assert {sampler.sample(scores, [slot])[0] for _ in range(30)} == {0}


@pytest.mark.parametrize(("pieces", "stops", "sent", "stopped"), [
    (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),
    (["a\n", "b"], ["\n"], "a", True),
    (["ab", "c", "d"], ["cx"], "abcd", False),  # "c" held back, then released
    (["x", "y"], [], "xy", False),
])
def test_stop_strings(pieces: list[str], stops: list[str], sent: str, stopped: bool) -> None:
    checker = StopStrings(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = checker.feed(p)
        out += text
        if hit:
            break
    if not hit:
        out += checker.flush()
    assert (out, hit) == (sent, stopped)


def test_chat_request_validation() -> None:
    ok = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}]}
    )
    assert ok.messages[0].to_message().model_dump(exclude_none=True) == {"role": "system", "content": "be brief"}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(APIError) as err:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "tool_choice": "auto"})
    assert err.value.param == "tool_choice" and err.value.status == 400
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "logprobs": True, "top_logprobs": 2, "stop": "END"})
    assert req.logprobs_wanted() == 2 and req.stop_list() == ["END"]
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
    specs = specs_from_options({"model_path": ("/m/a", "/m/B.gguf"), "model_name": ("a1,a2",), "dtype": "auto"},
                               kind_of("transformers"))
    assert specs[0].served_names() == ("a1", "a2") and specs[1].served_names() == ("b",)
    with pytest.raises(ModelLoadError):
        specs_from_options({"model_path": ()}, kind_of("transformers"))
    with pytest.raises(ModelLoadError):
        specs_from_options({"model_path": ("/m/a", "/n/a")}, kind_of("transformers"))  # both would be served as "a"


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


def test_sampler_draws_follow_the_distribution() -> None:
    """Temperature 1 over logits log([0.5, 0.3, 0.2, 0]): the draw frequencies
    match, and the zero-probability token is never drawn."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    sampler = Sampler(vocab_size=4)
    slots = [sampler.open(Sampling(temperature=1.0), seed=None) for _ in range(2000)]
    tokens = sampler.sample(probs.log().expand(2000, 4).clone(), slots) + sampler.sample(
        probs.log().expand(2000, 4).clone(), slots)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / len(tokens)
    assert freq[3] == 0
    assert torch.allclose(freq[:3], probs[:3], atol=0.05), freq


def test_attention_limits_cap_sliding_windows_and_refuse_softcapping() -> None:
    from types import SimpleNamespace

    from worker.loading import _attention_limits

    def model(**cfg: object) -> SimpleNamespace:
        config = SimpleNamespace(**cfg)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: config))

    spec = ModelSpec(path="m")
    assert _attention_limits(spec, model(), 8192) == 8192
    assert _attention_limits(spec, model(sliding_window=4096), 32768) == 4096  # full attention agrees up to the window
    assert _attention_limits(spec, model(sliding_window=4096, use_sliding_window=False), 32768) == 32768
    assert _attention_limits(spec, model(sliding_window=65536), 32768) == 32768
    with pytest.raises(ModelLoadError, match="soft-capping"):
        _attention_limits(spec, model(attn_logit_softcapping=50.0), 8192)


def test_keys_file_names_what_is_wrong_without_echoing_a_key(tmp_path: Path) -> None:
    from api.keys import KeysFileError, load_keys
    from broker.settings import Settings

    path = tmp_path / "keys.toml"
    path.write_text('[keys.team-a]\nkey = "sk-secret-1"\nrequests_per_minute = 0\n')
    with pytest.raises(KeysFileError) as err:
        load_keys(Settings(api_keys_file=path))
    assert "requests_per_minute" in str(err.value) and "sk-secret-1" not in str(err.value)
    path.write_text('[keys.key-1]\nkey = "sk-secret-2"\n')
    with pytest.raises(KeysFileError) as err:
        load_keys(Settings(api_keys=["sk-plain"], api_keys_file=path))
    assert "'key-1'" in str(err.value) and "given twice" in str(err.value)
    path.write_text('[keys.team-b]\nkey = "sk-secret-3"\ntokens_per_minute = 500\n')
    keys = load_keys(Settings(api_keys=["sk-plain"], api_keys_file=path))
    assert [(k.name, k.tokens_per_minute, k.limited) for k in keys] == [("key-1", None, False), ("team-b", 500, True)]
    assert "sk-secret-3" not in repr(keys)


def test_a_wake_from_another_thread_turns_the_consumer_loop() -> None:
    """worker/hubwake.py on kombu's real hub: a wake from a task's thread
    ends the hub's poll, so kombu's next loop turn can ask for the next job.
    (Who wakes it, and when: tests/test_pinned_internals.py.)"""
    import threading

    from kombu.asynchronous import Hub

    from worker.hubwake import HubWaker

    hub = Hub()
    woken = threading.Event()
    waker = HubWaker(hub, woken.set)
    threading.Timer(0.05, waker.wake).start()
    loop = hub.create_loop()
    for _ in range(5):  # each turn polls up to 1 s with no timers set
        next(loop)
        if woken.is_set():
            break
    assert woken.is_set()
    hub.close()


def test_loop_batcher_gathers_one_step_of_every_streaming_source() -> None:
    """llama-server writes each slot's token separately: the batcher sends a
    step's updates once every streaming source has put one; a late source's
    update goes out after QUIET_S without another, and a steady trickle is
    cut every GATHER_S (worker/engines/batchers.py)."""
    import asyncio
    from types import SimpleNamespace

    from worker.engines.batchers import LoopBatcher

    async def run() -> tuple[list[tuple[float, list[str]]], float, int]:
        loop = asyncio.get_running_loop()
        sent: list[tuple[float, list[str]]] = []
        a, b, c = (SimpleNamespace(name=n) for n in "abc")
        batcher = LoopBatcher(loop, lambda batch: sent.append((loop.time(), [u.choice.name for u in batch])),
                              sources=lambda: 3)
        batcher.put([SimpleNamespace(choice=a)])  # type: ignore[list-item]
        batcher.put([SimpleNamespace(choice=b)])  # type: ignore[list-item]
        await asyncio.sleep(0)
        assert sent == []  # c has not put yet
        batcher.put([SimpleNamespace(choice=c)])  # type: ignore[list-item]
        assert [names for _, names in sent] == [["a", "b", "c"]]
        batcher.put([SimpleNamespace(choice=a)])  # type: ignore[list-item]
        batcher.put([SimpleNamespace(choice=a)])  # type: ignore[list-item]
        last_put = loop.time()
        await asyncio.sleep(LoopBatcher.GATHER_S * 2)
        assert [names for _, names in sent] == [["a", "b", "c"], ["a", "a"]]
        # a trickle of one source, faster than the quiet: cut at least every GATHER_S
        end = loop.time() + LoopBatcher.GATHER_S * 10
        while loop.time() < end:
            batcher.put([SimpleNamespace(choice=b)])  # type: ignore[list-item]
            await asyncio.sleep(0)  # the loop turns (and fires due timers), with no quiet between puts
        await asyncio.sleep(LoopBatcher.GATHER_S * 2)
        return sent, last_put, len(sent) - 2

    sent, last_put, trickle_batches = asyncio.run(run())
    assert sent[1][0] >= last_put + LoopBatcher.QUIET_S  # the late update waited for the quiet
    assert trickle_batches >= 5


class FakeReceive:
    """An ASGI receive channel whose client hangs up when told to."""

    def __init__(self) -> None:
        self.hang_up = asyncio.Event()

    async def __call__(self) -> dict[str, object]:
        await self.hang_up.wait()
        return {"type": "http.disconnect"}


def test_a_hang_up_cancels_the_wait_at_once_as_a_499() -> None:
    async def scenario() -> tuple[float, list[str]]:
        receive, cleaned = FakeReceive(), []
        asyncio.get_running_loop().call_later(0.05, receive.hang_up.set)
        started = time.monotonic()
        with pytest.raises(APIError) as caught:
            async with CancelOnHangUp(receive):
                try:
                    await asyncio.sleep(30)  # a job waiting in the queue
                except asyncio.CancelledError:
                    cleaned.append("job cancelled")
                    raise
        assert caught.value.status == 499 and caught.value.code == "client_closed"
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        return time.monotonic() - started, cleaned

    waited, cleaned = asyncio.run(scenario())
    assert waited < 0.5 and cleaned == ["job cancelled"]


def test_a_hang_up_after_the_block_or_a_cancel_from_elsewhere_is_no_499() -> None:
    async def after_the_block() -> str:
        receive = FakeReceive()
        async with CancelOnHangUp(receive):
            await asyncio.sleep(0.01)
        receive.hang_up.set()
        await asyncio.sleep(0.05)  # the watcher is gone: nothing cancels this
        return "answered"

    async def stopped_from_elsewhere() -> None:
        receive = FakeReceive()
        async with asyncio.timeout(0.05):  # the server, not the client, ends the request
            async with CancelOnHangUp(receive):
                await asyncio.sleep(30)

    async def both_at_once() -> None:
        receive = FakeReceive()
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.02, lambda: (receive.hang_up.set(), task.cancel()))
        async with CancelOnHangUp(receive):
            await asyncio.sleep(30)

    assert asyncio.run(after_the_block()) == "answered"
    with pytest.raises(TimeoutError):
        asyncio.run(stopped_from_elsewhere())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(both_at_once())
