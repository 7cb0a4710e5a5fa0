"""Structured outputs and tools on the completions routes: OpenAI's
``response_format``, vLLM's ``structured_outputs`` and ``tools`` /
``tool_choice``, each turned into what the job carries."""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict

from pydantic import Field, field_validator, model_validator

from api.errors import invalid
from api.wire import Request, ToolChoice, lone_surrogate
from broker.schemas import Constraint, Function, Tool


class JsonSchemaFormat(Request):
    """``response_format.json_schema``. The engine always holds the output to
    the schema, so ``strict`` changes nothing."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise invalid("response_format.json_schema",
                          "'response_format.json_schema' is required when 'response_format.type' is 'json_schema'.")
        if self.type != "json_schema" and self.json_schema is not None:
            raise invalid("response_format.json_schema", "'response_format.json_schema' is only allowed when "
                          f"'response_format.type' is 'json_schema', not {self.type!r}.")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        # json_object: any JSON object (None); json_schema without a schema: any JSON ({}).
        schema = None if self.json_schema is None else self.json_schema.schema_ or {}
        return Constraint(kind="json", json_schema=schema, param="response_format")


class StructuredOutputs(Request):
    """vLLM's extension (the SDK's ``extra_body={"structured_outputs": ...}``):
    exactly one constraint on the output."""

    choice: list[str] | None = Field(default=None, min_length=1, description="the output is one of these")
    regex: str | None = Field(default=None, min_length=1)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json",
                                               description="a JSON schema, as an object or as its JSON text")
    grammar: str | None = Field(default=None, min_length=1, description="an EBNF grammar with a root rule")

    @field_validator("json_", mode="before")
    @classmethod
    def _schema_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise invalid("structured_outputs.json", "'structured_outputs.json' is a string but not valid "
                              "JSON; send the schema as an object or as its JSON text.") from None
            # The text may escape a lone surrogate that the body check could not see.
            if lone_surrogate(value) is not None:
                raise invalid("structured_outputs.json", "'structured_outputs.json' holds a lone surrogate.")
        if value is not None and not isinstance(value, dict):
            raise invalid("structured_outputs.json", "'structured_outputs.json' must be a JSON schema object.")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k, v in (("choice", self.choice), ("regex", self.regex), ("json", self.json_),
                                ("grammar", self.grammar)) if v is not None]
        if len(given) != 1:
            got = ", ".join(repr(k) for k in given) or "none"
            raise invalid("structured_outputs", "'structured_outputs' takes exactly one of 'choice', 'regex', "
                          f"'json', 'grammar'; got {got}.")
        return self

    def constraint(self) -> Constraint:
        param = "structured_outputs"
        if self.choice is not None:
            return Constraint(kind="choice", choices=self.choice, param=param)
        if self.regex is not None:
            return Constraint(kind="regex", pattern=self.regex, param=param)
        if self.grammar is not None:
            return Constraint(kind="grammar", ebnf=self.grammar, param=param)
        schema = self.json_ if isinstance(self.json_, dict) else None  # a string was parsed into a dict above
        return Constraint(kind="json", json_schema=schema, param=param)


class ToolIn(Request):
    type: Literal["function"]
    function: Function

    def to_tool(self) -> Tool:
        return Tool(function=self.function)


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ToolFields(TypedDict):
    """The job's tool fields (``job_fields()`` carries them)."""

    tools: list[Tool] | None
    tool_choice: ToolChoice
    tool_name: str | None
    parallel_tool_calls: bool
