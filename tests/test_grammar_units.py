"""The worker's grammar pieces without a model run: tool-call parsing per
format, piece by piece; each format's structural tag compiles for every
tool_choice; masks let through only what the grammar allows, and rows
without a grammar are untouched."""

from __future__ import annotations

import json

import pytest
import torch

from broker.schemas import Constraint, Function, Job, Tool, ToolCallDelta
from tests.procs import DEMO_MODEL_DIR
from worker.engines.protocol import Refused
from worker.engines.transformers.grammars import Grammars
from worker.engines.transformers.sampler import Sampler
from worker.grammar import check_spec, spec_of
from worker.toolcalls import FORMATS, format_for, render_generic

WEATHER = Tool(function=Function(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
TIME = Tool(function=Function(name="get_time"))
ARGS = '{"city": "Pa{ris\\"}", "n": [1, {"x": 2}]}'
TEXTS = {
    "hermes": f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": f'{{"name": "get_weather", "parameters": {ARGS}}}{{"name": "get_time", "parameters": {{}}}}',
    "mistral": f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {ARGS}}}][TOOL_CALLS][{{"name": "get_time", '
               '"arguments": {}}]',
}


def job(**kw: object) -> Job:
    return Job(job_id="j", model="m", kind="chat", reply_channel="c", submitted_at=0.0, **kw)  # type: ignore[arg-type]


def reassemble(pieces: list[ToolCallDelta]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for p in pieces:
        if p.id is not None:
            assert p.id.startswith("call_") and p.name and p.index not in calls
            calls[p.index] = [p.name, ""]
        calls[p.index][1] += p.arguments
    return [(name, args) for name, args in (calls[i] for i in sorted(calls))]


@pytest.mark.parametrize("fmt", sorted(TEXTS))
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_parser_splits_content_and_calls_at_any_chunking(fmt: str, step: int) -> None:
    parser, text = FORMATS[fmt].parser(), TEXTS[fmt]
    content, pieces = "", []
    for i in range(0, len(text), step):
        c, p = parser.feed(text[i:i + step])
        content, pieces = content + c, pieces + p
    c, p = parser.flush()
    content, pieces = content + c, pieces + p
    assert content == ("Let me check.\n" if fmt == "hermes" else "")
    assert reassemble(pieces) == [("get_weather", ARGS), ("get_time", "{}")]
    assert json.loads(ARGS)  # the arguments came through byte for byte
    assert parser.calls == 2


def test_text_that_only_looks_like_a_trigger_is_content() -> None:
    parser = FORMATS["hermes"].parser()
    assert parser.feed("a <tool_c") == ("a ", [])  # held back: it may become the trigger
    assert parser.feed("ar> b") == ("<tool_car> b", [])
    assert parser.flush() == ("", [])


def test_format_from_the_chat_template() -> None:
    class Tok:
        chat_template = "{% for m in messages %}<tool_call>{% endfor %}"

    assert format_for(Tok()).name == "hermes"
    Tok.chat_template = "[TOOL_CALLS] {{ x }}"
    assert format_for(Tok()).name == "mistral"
    Tok.chat_template = "{{ '<|python_tag|>' }}"
    assert format_for(Tok()).name == "llama3_json"
    Tok.chat_template = "{{ messages }}"
    assert format_for(Tok()).name == "generic"
    assert format_for(Tok(), "mistral").name == "mistral"


def test_generic_rendering_lists_tools_and_writes_history_as_calls() -> None:
    from broker.schemas import FunctionCall, Message, ToolCall

    messages = [Message(role="user", content="hi"),
                Message(role="assistant", tool_calls=[ToolCall(id="call_1", function=FunctionCall(
                    name="get_weather", arguments='{"city": "Paris"}'))]),
                Message(role="tool", tool_call_id="call_1", content="sunny")]
    out = render_generic(messages, [WEATHER])
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("choice", ["auto", "required", "function"])
def test_every_format_compiles_for_every_tool_choice(fmt: str, choice: str) -> None:
    spec = spec_of(job(tools=[WEATHER, TIME], tool_choice=choice, tool_name="get_time" if choice == "function" else None,
                       parallel_tool_calls=choice != "auto"), FORMATS[fmt])
    assert spec is not None and spec.kind == "structural_tag" and spec.param == "tools"
    check_spec(spec)


def test_unbuildable_grammars_are_refused_naming_the_field() -> None:
    for c in (Constraint(kind="json", json_schema={"type": "nonsense"}),
              Constraint(kind="regex", pattern="(?<=a)b", param="structured_outputs"),
              Constraint(kind="grammar", ebnf="root ::= undefined_rule", param="structured_outputs")):
        spec = spec_of(job(constraint=c), FORMATS["generic"])
        assert spec is not None
        with pytest.raises(Refused) as err:
            check_spec(spec)
        assert err.value.param == c.param and "xgrammar" in str(err.value)


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    if not (DEMO_MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip(f"{DEMO_MODEL_DIR} not built (make test builds it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    return Grammars(tok, len(tok), [tok.eos_token_id])


def test_sampler_masks_only_constrained_rows(grammars: Grammars) -> None:
    """Random logits, greedy: the constrained rows still spell one of the
    choices and end with EOS; the free row picks its own argmax."""
    from broker.schemas import Sampling

    compiled = grammars.compile(spec_of(job(constraint=Constraint(kind="choice", choices=["yes", "no"])),
                                        FORMATS["generic"]))  # type: ignore[arg-type]
    sampler = Sampler(grammars.vocab_size, grammars=grammars)
    slots = [sampler.open(Sampling(temperature=0), None) for _ in range(3)]
    for s in slots[:2]:
        s.matcher = grammars.matcher(compiled)
    gen = torch.Generator().manual_seed(0)
    picked: list[list[int]] = [[], [], []]
    for _ in range(8):
        logits = torch.randn(3, grammars.vocab_size, generator=gen)
        free_argmax = int(logits[2].argmax())
        tokens = sampler.sample(logits, slots)
        assert tokens[2] == free_argmax
        for i in range(3):
            picked[i].append(tokens[i])
        if all(s.matcher.is_terminated() for s in slots[:2]):
            break
    for s in slots[:2]:
        assert s.matcher.is_terminated()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR))
    for row in picked[:2]:
        end = row.index(tok.eos_token_id)
        assert tok.decode(row[:end]) in ("yes", "no")
