"""The synthetic engine's parts that need no worker: its own tokenizer,
text pieces, the answers that meet a constraint, and its options."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from broker.schemas import Constraint, Function, Job, Sampling, Tool
from worker.bootstep import specs_from_options
from worker.engines.protocol import Refused
from worker.engines.registry import kind_of
from worker.engines.synthetic import SyntheticOptions
from worker.engines.synthetic.answers import check, fixed_text, free_text, instance, pieces_of, top_logprobs
from worker.engines.synthetic.words import PASSAGE, WordTokenizer
from worker.loading import ModelLoadError
from worker.toolcalls import FORMATS, ToolCallParser


def job(**fields: object) -> Job:
    return Job(job_id="j", model="m", kind="chat", messages=[{"role": "user", "content": "hi"}], reply_channel="c",
               submitted_at=0.0, **fields)  # type: ignore[arg-type]


def test_word_tokenizer_round_trips_any_text_and_knows_its_words() -> None:
    t = WordTokenizer()
    text = "<|user|>This answer, in ünïcode 🙂 and  spaces\n<|end|><|assistant|>"
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert t.decode(ids, skip_special_tokens=True) == text.replace("<|user|>", "").replace("<|end|>", "").replace(
        "<|assistant|>", "")
    assert t.encode(" answer comes") == [t.encode(" answer")[0], t.encode(" comes")[0]]  # a word, a token
    assert all(0 <= i < len(t) for i in ids) and t.eos_token_id in ids


def test_word_tokenizer_renders_a_chat() -> None:
    t = WordTokenizer()
    text = t.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                 tokenize=False)
    assert text == "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>"
    ids = t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(ids, list) and t.decode(ids) == "<|user|>hi<|end|><|assistant|>"


def test_pieces_join_to_the_text_with_either_tokenizer() -> None:
    from tests.procs import DEMO_MODEL_DIR
    from worker.loading import ModelSpec, load_tokenizer

    for tokenizer in (WordTokenizer(), load_tokenizer(ModelSpec(path=str(DEMO_MODEL_DIR)))):
        for text in (PASSAGE, json.dumps({"naïve": "ünï 🙂", "n": [1, 2.5]}), "x"):
            pieces = pieces_of(tokenizer, text)
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert "".join(p for p, _ in pieces) == text and all(p for p, _ in pieces), (tokenizer, pieces)
            assert len(pieces) <= len(ids) and {t for _, t in pieces} <= set(ids)


class Address(BaseModel):
    street: str = Field(min_length=12)
    zip: int = Field(ge=10000, le=99999)


class Person(BaseModel):
    name: str
    email: str = Field(json_schema_extra={"format": "email"})
    age: int = Field(gt=17)
    score: float
    tags: list[str] = Field(min_length=2, max_length=3)
    role: Literal["admin", "user"]
    home: Address
    past: list[Address]
    nickname: str | None
    active: bool


def test_instance_meets_a_pydantic_schema_with_refs_bounds_and_unions() -> None:
    value = instance(Person.model_json_schema())
    Person.model_validate(value)  # raises if the instance does not meet the schema
    assert value["age"] == 18 and len(value["tags"]) == 2 and value["home"]["zip"] == 10000


def test_a_recursive_schema_ends() -> None:
    schema = {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}}}
    value = instance(schema)
    depth = 0
    while isinstance(value, dict):
        value, depth = value["next"], depth + 1
    assert value is None and depth > 1


def test_constrained_answers() -> None:
    fmt = FORMATS["generic"]
    schema = Address.model_json_schema()
    Address.model_validate_json(fixed_text(job(constraint=Constraint(kind="json", json_schema=schema)), 0, fmt) or "")
    assert json.loads(fixed_text(job(constraint=Constraint(kind="json")), 0, fmt) or "") == {"answer": "synthetic"}
    greedy = job(constraint=Constraint(kind="choice", choices=["yes", "no"]), sampling=Sampling(temperature=0))
    assert fixed_text(greedy, 0, fmt) == "yes"
    sampled = job(constraint=Constraint(kind="choice", choices=["a", "b", "c", "d"]), sampling=Sampling(seed=1))
    assert {fixed_text(sampled, i, fmt) for i in range(12)} <= {"a", "b", "c", "d"}
    assert len({fixed_text(sampled, i, fmt) for i in range(12)}) > 1
    assert fixed_text(job(), 0, fmt) is None


def test_a_required_tool_call_parses_as_one() -> None:
    tools = [Tool(function=Function(name="get_weather", parameters={"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]})), Tool(function=Function(name="other"))]
    for choice, name in (("required", "get_weather"), ("function", "other")):
        text = fixed_text(job(tools=tools, tool_choice=choice, tool_name=name if choice == "function" else None), 0,
                          FORMATS["hermes"])
        assert text is not None
        parser = ToolCallParser(FORMATS["hermes"])
        content, calls = parser.feed(text)
        more, more_calls = parser.flush()
        assert (content + more).strip() == "" and parser.calls == 1
        pieces = calls + more_calls
        assert pieces[0].name == name
        arguments = json.loads("".join(p.arguments for p in pieces))
        assert arguments == ({"city": "synthetic"} if name == "get_weather" else {})
    assert fixed_text(job(tools=tools, tool_choice="auto"), 0, FORMATS["hermes"]) is None


def test_free_text_is_the_passage_greedy_and_differs_when_sampled() -> None:
    passage = pieces_of(WordTokenizer(), PASSAGE)
    greedy = free_text(job(sampling=Sampling(temperature=0)), 0, passage, set())
    assert "".join(next(greedy)[0] for _ in range(len(passage) + 2)).startswith(PASSAGE + "This answer")
    sampled = job(sampling=Sampling(seed=7))
    starts = {next(free_text(sampled, i, passage, set()))[0] for i in range(4)}
    assert len(starts) > 1


def test_banned_tokens_are_passed_over_and_top_logprobs_are_k_distinct_descending() -> None:
    t = WordTokenizer()
    passage = pieces_of(t, PASSAGE)
    banned = {t.encode("This")[0], t.encode(" the")[0]}
    text = free_text(job(sampling=Sampling(temperature=0)), 0, passage, banned)
    first = [next(text)[0] for _ in range(len(passage))]
    assert first[:5] == [" answer", " comes", " from", " synthetic", " engine"]
    assert "This" not in first and " the" not in first
    everything = {token for _, token in passage}
    assert next(free_text(job(sampling=Sampling(temperature=0)), 0, passage, everything))[0] == "This"
    top = top_logprobs(" answer", 5, passage, 0)
    assert [s for s, _ in top][0] == " answer" and len({s for s, _ in top}) == 5
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert top_logprobs("x", 0, passage, 3) == []


@pytest.mark.parametrize("kind,field", [("regex", {"pattern": "a+"}), ("grammar", {"ebnf": 'root ::= "a"'})])
def test_regex_and_grammars_are_refused_naming_the_parameter(kind: str, field: dict[str, str]) -> None:
    with pytest.raises(Refused) as exc:
        check(job(constraint=Constraint(kind=kind, param="structured_outputs", **field)))  # type: ignore[arg-type]
    assert exc.value.param == "structured_outputs" and "synthetic" in str(exc.value)
    check(job(constraint=Constraint(kind="json")))


def test_options_and_a_model_with_no_files() -> None:
    kind = kind_of("synthetic")
    assert not kind.weights and {o.name for o in kind.options} == {
        "synthetic_step_ms", "synthetic_prefill_us", "synthetic_output_tokens"}
    opts = SyntheticOptions.read({"engine": "synthetic", "max_batch_size": 64, "synthetic_step_ms": 5.0,
                                  "synthetic_prefill_us": 0.0, "synthetic_output_tokens": 40})
    assert (opts.step_s, opts.prefill_s_per_token, opts.output_tokens, opts.max_batch_size) == (0.005, 0.0, 40, 64)
    specs = specs_from_options({"model_name": ("synth-a,synth-b", "synth-c")}, kind)
    assert [s.served_names() for s in specs] == [("synth-a", "synth-b"), ("synth-c",)] and specs[0].path == ""
    with pytest.raises(ModelLoadError):
        specs_from_options({"model_name": ("synth-a",)}, kind_of("transformers"))
    with pytest.raises(ModelLoadError):
        specs_from_options({}, kind)


def test_a_synthetic_worker_loads_no_torch_and_no_transformers() -> None:
    """What a model with no files builds: its own tokenizer; the worker's
    whole import chain for it stays clear of the model libraries."""
    import subprocess
    import sys

    from tests.procs import ROOT

    code = ("import sys, redis; import worker.app, worker.bootstep, worker.runtime; "
            "from worker.engines.registry import kind_of; from worker.loading import ModelSpec; "
            "from worker.publish import Publisher; k = kind_of('synthetic'); "
            "e = k.engine_class()(ModelSpec(path='', names=('synth',)), k.options_type.read({}), "
            "Publisher(redis.Redis(port=1))); print(e.names, e.vocab_size, e.context_length); e.stop(); "
            "print([m for m in ('torch', 'transformers', 'vllm', 'xgrammar') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=60)
    assert out.stdout.splitlines() == [f"('synth',) {len(WordTokenizer())} 8192", "[]"], out.stderr
