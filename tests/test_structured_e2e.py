"""Structured outputs and tool calls end to end: the real ``openai`` SDK and
LangChain against the API and a worker with the demo model, whose grammar
masks hold every answer to its schema (worker/grammar.py).

The demo model is tiny: left free it rarely writes valid JSON, so a valid
answer here is the grammar's doing. Its chat template knows no tools, so
tools reach it through llmq's generic rendering (worker/toolcalls.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Stack


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int


class Pet(BaseModel):
    species: Literal["cat", "dog", "fish"]
    owner: Person  # nested: a $defs/$ref in the schema pydantic writes


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                        "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a time zone.",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                "required": ["zone"]}},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="none", max_retries=0, timeout=120)


def _check_weather_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and isinstance(args["city"], str)
    return args


# ----------------------------------------------------------------- response_format


def test_parse_returns_a_pydantic_object(client: openai.OpenAI, stack: Stack) -> None:
    out = client.chat.completions.parse(
        model=stack.model, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format=Person, temperature=0, max_tokens=100,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person), choice.message.content


def test_nested_schema_with_refs_validates_streaming_too(client: openai.OpenAI, stack: Stack) -> None:
    schema = Pet.model_json_schema()
    assert "$defs" in schema
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    stream = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "A pet and its owner, as JSON."}],
        response_format=fmt, temperature=0.7, seed=3, max_tokens=120, stream=True,  # type: ignore[arg-type]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Pet.model_validate_json(text)


def test_json_object_at_temperature_one_with_n_4_all_parse(client: openai.OpenAI, stack: Stack) -> None:
    out = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}],
        response_format={"type": "json_object"}, temperature=1.0, n=4, seed=1, max_tokens=300,
    )
    assert len(out.choices) == 4
    for c in out.choices:
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(json.loads(c.message.content or ""), dict)


def test_a_schema_cut_by_max_tokens_says_length(client: openai.OpenAI, stack: Stack) -> None:
    out = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}},
        temperature=0, max_tokens=3,
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 3


@pytest.mark.parametrize("schema", [{"type": "nonsense"}, {"$ref": "#/$defs/missing"}])
def test_a_schema_the_library_cannot_compile_is_a_400(client: openai.OpenAI, stack: Stack,
                                                      schema: dict[str, Any]) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=stack.model, messages=ASK_WEATHER, stream=stream,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            )
        assert err.value.param == "response_format"
        assert "xgrammar" in err.value.message


# ------------------------------------------------------------- vLLM's extension


def test_structured_outputs_choice_regex_and_grammar(client: openai.OpenAI, stack: Stack) -> None:
    colors = ["red", "green", "blue"]
    out = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Pick a color."}], temperature=1.0, n=3, seed=5,
        extra_body={"structured_outputs": {"choice": colors}},
    )
    assert all(c.message.content in colors for c in out.choices)
    text = client.completions.create(
        model=stack.model, prompt="My phone number is", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
    ).choices[0].text
    assert len(text) == 8 and text[3] == "-" and (text[:3] + text[4:]).isdigit()
    text = client.completions.create(
        model=stack.model, prompt="Answer yes or no:", max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}},
    ).choices[0].text
    assert text in ("yes", "no")


# ----------------------------------------------------------------------- tools


def test_required_tool_call_in_openai_shape(client: openai.OpenAI, stack: Stack) -> None:
    out = client.chat.completions.create(
        model=stack.model, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required",  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_tokens=100,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name in ("get_weather", "get_time")
    json.loads(choice.message.tool_calls[0].function.arguments)


def test_named_tool_streamed_equals_not_streamed(client: openai.OpenAI, stack: Stack) -> None:
    kw: dict[str, Any] = dict(model=stack.model, messages=ASK_WEATHER, tools=[TIME, WEATHER], temperature=0,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=100)
    whole = client.chat.completions.create(**kw)
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    _check_weather_call(call)
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    pieces = 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:  # only in the call's first piece, with its name
                    assert entry["id"] is None and d.function and d.function.name
                    entry["id"], entry["name"] = d.id, d.function.name
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
                pieces += 1
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    assert list(calls) == [0] and pieces > 2  # the arguments come in pieces
    assert calls[0]["name"] == call.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)


def test_auto_may_answer_in_text_and_none_never_calls(client: openai.OpenAI, stack: Stack) -> None:
    auto = client.chat.completions.create(
        model=stack.model, messages=[{"role": "user", "content": "Say hello."}], tools=[WEATHER],  # type: ignore[list-item]
        temperature=0, max_tokens=30,
    ).choices[0]
    if auto.message.tool_calls:  # the model's pick; a call it starts must be whole
        _check_weather_call(auto.message.tool_calls[0])
    else:
        assert auto.message.content
    none = client.chat.completions.create(
        model=stack.model, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none",  # type: ignore[list-item]
        temperature=0, max_tokens=30,
    ).choices[0]
    assert none.message.tool_calls is None and none.message.content
    assert none.finish_reason in ("stop", "length")


def test_second_turn_with_a_tool_result(client: openai.OpenAI, stack: Stack) -> None:
    first = client.chat.completions.create(
        model=stack.model, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
        parallel_tool_calls=False, temperature=0, max_tokens=100,
    ).choices[0].message
    call = first.tool_calls[0]  # type: ignore[index]
    history: list[Any] = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    second = client.chat.completions.create(model=stack.model, messages=history, tools=[WEATHER],  # type: ignore[list-item]
                                            tool_choice="none", temperature=0, max_tokens=40)
    assert second.choices[0].message.content
    assert second.usage is not None and second.usage.prompt_tokens > 60  # the call and its result were in the prompt


def test_langchain_structured_output_and_bind_tools(stack: Stack) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=stack.model, base_url=stack.v1, api_key="none", temperature=0, max_tokens=100,  # type: ignore[arg-type]
                     max_retries=0)
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?")
    assert len(msg.tool_calls) == 1  # type: ignore[attr-defined]
    assert msg.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)  # type: ignore[attr-defined]


def test_mixed_batch_of_constrained_and_free_requests(client: openai.OpenAI, stack: Stack) -> None:
    """16 at once, half held to a schema, half free, sharing engine steps."""
    def one(i: int) -> tuple[bool, str | None, str]:
        constrained = i % 2 == 0
        extra: dict[str, Any] = {"response_format": Person} if constrained else {}
        out = (client.chat.completions.parse if constrained else client.chat.completions.create)(
            model=stack.model, messages=[{"role": "user", "content": f"Person number {i}, please."}],
            temperature=0.8, seed=i, max_tokens=80, **extra)
        return constrained, out.choices[0].finish_reason, out.choices[0].message.content or ""

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    constrained = [(f, text) for c, f, text in results if c]
    assert len(constrained) == 8
    for finish, text in constrained:
        assert finish == "stop", text
        Person.model_validate_json(text)
    assert all(text for c, _, text in results if not c)
