"""Every OpenAI sampling option the engine honours, through the real stack:
stop, n, seed, logprobs, penalties, logit_bias, echo."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.e2e

FRUITS = [{"role": "user", "content": "List three fruits, one per line."}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=120)


def stream_text(chunks: list, index: int = 0) -> str:  # type: ignore[type-arg]
    return "".join(
        (getattr(c.choices[0].delta, "content", None) if hasattr(c.choices[0], "delta") else c.choices[0].text) or ""
        for c in chunks if c.choices and c.choices[0].index == index
    )


def test_stop_string_is_never_emitted_nor_overrun(client: openai.OpenAI, stack: Stack) -> None:
    free = client.chat.completions.create(model=stack.model, messages=FRUITS, temperature=0, max_tokens=40)
    full = free.choices[0].message.content
    assert "\n" in full, full
    r = client.chat.completions.create(model=stack.model, messages=FRUITS, temperature=0, max_tokens=40,
                                       stop=["\n", "zzz"])
    text = r.choices[0].message.content
    print("without stop:", repr(full), "| with stop:", repr(text))
    assert text == full.split("\n")[0]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < free.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=stack.model, messages=FRUITS, temperature=0, max_tokens=40,
                                                 stop="\n", stream=True))
    assert stream_text(chunks) == text


def test_multi_token_stop_string_split_across_tokens(client: openai.OpenAI, stack: Stack) -> None:
    full = client.completions.create(model=stack.model, prompt="The capital of France is", temperature=0,
                                     max_tokens=12).choices[0].text
    cut = full.index("Paris") + 3  # "Par" | "is...": the stop straddles token boundaries
    stop = full[cut - 2 : cut + 2]
    r = client.completions.create(model=stack.model, prompt="The capital of France is", temperature=0,
                                  max_tokens=12, stop=stop)
    assert r.choices[0].text == full[: full.index(stop)]
    chunks = list(client.completions.create(model=stack.model, prompt="The capital of France is", temperature=0,
                                            max_tokens=12, stop=stop, stream=True))
    assert stream_text(chunks) == r.choices[0].text


def test_n_choices_each_with_index(client: openai.OpenAI, stack: Stack) -> None:
    r = client.chat.completions.create(model=stack.model, messages=FRUITS, n=3, max_tokens=8, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24 or all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # independent samples
    chunks = list(client.chat.completions.create(model=stack.model, messages=FRUITS, n=2, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    assert stream_text(chunks, 0) == stream_text(chunks, 1)  # greedy twice: the same text
    assert chunks[-1].usage.completion_tokens == 16


def test_same_seed_same_text(client: openai.OpenAI, stack: Stack) -> None:
    def ask(seed: int) -> str:
        return client.chat.completions.create(model=stack.model, messages=FRUITS, temperature=1.0, seed=seed,
                                              max_tokens=24).choices[0].message.content

    a, b, c = ask(1234), ask(1234), ask(99)
    print("seed 1234:", repr(a), "| seed 99:", repr(c))
    assert a == b
    assert a != c


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI, stack: Stack) -> None:
    r = client.chat.completions.create(model=stack.model, messages=FRUITS, temperature=0, max_tokens=5,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy takes the most likely token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token
    plain = client.chat.completions.create(model=stack.model, messages=FRUITS, temperature=0, max_tokens=5)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_echo(client: openai.OpenAI, stack: Stack) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=stack.model, prompt=prompt, temperature=0, max_tokens=4, logprobs=2,
                                  echo=True)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith(prompt) and "Paris" in text[len(prompt):]
    assert len(lp.tokens) == 4 and lp.text_offset[0] == len(prompt)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert r.usage.completion_tokens == 4
    chunks = list(client.completions.create(model=stack.model, prompt=prompt, temperature=0, max_tokens=4,
                                            echo=True, stream=True))
    assert stream_text(chunks) == text


def test_penalties_change_a_repetitive_answer(client: openai.OpenAI, stack: Stack) -> None:
    msgs = [{"role": "user", "content": "Write the word 'hello' twenty times, separated by spaces."}]
    plain = client.chat.completions.create(model=stack.model, messages=msgs, temperature=0, max_tokens=30)
    pen = client.chat.completions.create(model=stack.model, messages=msgs, temperature=0, max_tokens=30,
                                         frequency_penalty=2.0, presence_penalty=2.0)
    a, b = plain.choices[0].message.content, pen.choices[0].message.content
    print("plain:", repr(a), "| penalized:", repr(b))
    assert a.lower().count("hello") > b.lower().count("hello")


def test_logit_bias_bans_a_token(client: openai.OpenAI, stack: Stack) -> None:
    base = client.completions.create(model=stack.model, prompt="The capital of France is", temperature=0,
                                     max_tokens=3, logprobs=0)
    first = base.choices[0].logprobs.tokens[0]
    assert first == " Paris"
    from transformers import AutoTokenizer

    from tests.procs import DEMO_MODEL_DIR

    ban = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).encode(first)
    assert len(ban) == 1
    r = client.completions.create(model=stack.model, prompt="The capital of France is", temperature=0, max_tokens=3,
                                  logit_bias={str(ban[0]): -100})
    assert not r.choices[0].text.startswith(" Paris")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=stack.model, prompt="x", max_tokens=1, logit_bias={"99999999": 5})
    assert err.value.param == "logit_bias"
