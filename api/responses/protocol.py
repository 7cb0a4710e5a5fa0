"""OpenAI's Responses API on the wire (``POST /v1/responses``): the request,
its tools and text format, and what they become for a job (tools, a
constraint, sampling; its input items: ``api/responses/items.py``); and
``StoredResponse``, what is kept of a request in Redis
(``api/responses/store.py``).

As in ``api/completions/protocol.py``: unknown fields are a 400 naming them; fields
OpenAI defines that llmq does not honour are declared and refused when set
to anything but their neutral value, never accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.errors import invalid, unsupported
from api.responses.items import InputItem, MessageItem, parse_item
from api.wire import GREEDY_BELOW_TEMPERATURE, TOOL_CHOICE_MODES, Request, ToolChoice
from broker.schemas import SERVICE_TIERS, Constraint, Function, Job, Message, Sampling, Tool

# OpenAI's limits on metadata: 16 pairs, keys up to 64 characters, values up to 512.
METADATA_MAX_PAIRS = 16
METADATA_KEY_MAX = 64
METADATA_VALUE_MAX = 512

# Fields OpenAI defines that llmq refuses, with why; each is fine when absent or null.
_REFUSED: dict[str, str] = {
    "reasoning": "The models served here have no reasoning settings.",
    "prompt": "Stored prompt templates are not kept by this server; send 'input' and 'instructions'.",
    "conversation": "Conversations are not kept by this server; chain responses with 'previous_response_id'.",
    "max_tool_calls": "The engine cannot bound the number of tool calls.",
}


class FunctionToolIn(Request):
    """A function tool, in the Responses API's flat shape."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_tool(self) -> Tool:
        return Tool(function=Function(name=self.name, description=self.description, parameters=self.parameters,
                                      strict=self.strict))


class NamedFunctionChoice(Request):
    type: Literal["function"]
    name: str


class TextFormat(Request):
    """``text.format``: free text, any JSON object, or a JSON schema (flat, as the Responses API sends it)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise invalid("text.format", "'text.format' of type 'json_schema' needs 'name' and 'schema'.")
        if self.type != "json_schema" and (self.schema_ is not None or self.name is not None):
            raise invalid("text.format", f"'text.format' of type {self.type!r} takes no 'name' or 'schema'.")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        return Constraint(kind="json", json_schema=self.schema_ if self.type == "json_schema" else None,
                          param="text.format")


class TextConfig(Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.verbosity not in (None, "medium"):
            raise unsupported("text.verbosity", "The engine cannot steer how much the model writes.")
        return self

    def echo(self) -> dict[str, Any]:
        fmt = self.format.model_dump(by_alias=True, exclude_none=True) if self.format else {"type": "text"}
        return {"format": fmt, "verbosity": "medium"}


class StreamOptionsIn(Request):
    include_obfuscation: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> StreamOptionsIn:
        if self.include_obfuscation:
            raise unsupported("stream_options.include_obfuscation", "Stream events carry no obfuscation padding.")
        return self


class ResponseCreateRequest(Request):
    model: str = Field(min_length=1)
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptionsIn | None = None
    background: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    tools: list[FunctionToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Declared so that they are refused by name (_REFUSED), not as unknown fields.
    reasoning: Any = None
    prompt: Any = None
    conversation: Any = None
    max_tool_calls: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        # Dispatched by hand: pydantic's union errors name the member tried, not the item.
        if isinstance(value, list):
            return [parse_item(raw, f"input.{i}") for i, raw in enumerate(value)]
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_types(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind != "function":
                    raise unsupported(f"tools.{i}.type", f"Tools of type {kind!r} are not supported; only "
                                      "'function' tools (the client runs them).")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_form(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value in TOOL_CHOICE_MODES):
            return value
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
            return value
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            raise unsupported("tool_choice", f"'tool_choice' of type {value['type']!r} is not supported.")
        raise invalid("tool_choice", "'tool_choice' is 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"name\": ...}.")

    @model_validator(mode="after")
    def _check(self) -> ResponseCreateRequest:
        for name, why in _REFUSED.items():
            if getattr(self, name) is not None:
                raise unsupported(name, why)
        if self.truncation == "auto":
            raise unsupported("truncation", "Only 'disabled': an input too long for the model is refused.")
        if self.include:
            raise unsupported("include", "No extra output data can be included.")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "Log probabilities are served on /v1/chat/completions.")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        if self.background and not self.store:
            raise invalid("background", "A background response must be stored: 'background': true needs "
                          "'store': true.")
        if isinstance(self.input, str) and not self.input:
            raise invalid("input", "'input' must not be empty.")
        self._check_metadata()
        self._check_tools()
        constraint = self.constraint()
        if constraint is not None and self.tool_mode()[0] != "none":
            raise invalid("text.format", "'text.format' cannot be combined with 'tools' unless 'tool_choice' is "
                          "'none': tool calls are themselves constrained output.")
        return self

    def _check_metadata(self) -> None:
        meta = self.metadata or {}
        if len(meta) > METADATA_MAX_PAIRS:
            raise invalid("metadata", f"'metadata' holds at most {METADATA_MAX_PAIRS} pairs.")
        for key, value in meta.items():
            if len(key) > METADATA_KEY_MAX or len(value) > METADATA_VALUE_MAX:
                raise invalid("metadata", f"'metadata' keys have at most {METADATA_KEY_MAX} characters and values "
                              f"at most {METADATA_VALUE_MAX}.")

    def _check_tools(self) -> None:
        names = [t.name for t in self.tools or []]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise invalid("tools", f"'tools' names each function once; {repeated[0]!r} appears more than once.")
        if not self.tools and self.tool_choice not in (None, "none"):
            raise invalid("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        if isinstance(self.tool_choice, NamedFunctionChoice) and self.tool_choice.name not in names:
            raise invalid("tool_choice", f"'tool_choice' names the function {self.tool_choice.name!r}, which is "
                          "not one of 'tools'.")

    # ------------------------------------------------------------ what the job carries

    def items(self) -> list[InputItem]:
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    def listed_items(self) -> list[dict[str, Any]]:
        return [item.listed(f"input.{i}") for i, item in enumerate(self.items())]

    def constraint(self) -> Constraint | None:
        return self.text.format.constraint() if self.text is not None and self.text.format is not None else None

    def tool_mode(self) -> tuple[ToolChoice, str | None]:
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            return "function", choice.name
        return choice or ("auto" if self.tools else "none"), None

    def sampling(self) -> Sampling:
        t = self.temperature
        return Sampling(max_tokens=self.max_output_tokens,
                        temperature=1.0 if t is None else 0.0 if t < GREEDY_BELOW_TEMPERATURE else t,
                        top_p=1.0 if self.top_p is None else self.top_p)

    def priority(self) -> int:
        return SERVICE_TIERS[self.service_tier or "auto"]

    def job(self, job_id: str, messages: list[Message], events_stream: str, submitted_at: float) -> Job:
        mode, name = self.tool_mode()
        return Job(job_id=job_id, model=self.model, kind="chat", messages=messages, sampling=self.sampling(),
                   constraint=self.constraint(), tools=[t.to_tool() for t in self.tools] if self.tools else None,
                   tool_choice=mode, tool_name=name, parallel_tool_calls=self.parallel_tool_calls is not False,
                   reply_channel="", submitted_at=submitted_at, priority=self.priority(), events_stream=events_stream)

    def echo(self) -> dict[str, Any]:
        """The request's fields as the Response object repeats them."""
        mode, name = self.tool_mode()
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": dict(self.metadata or {}),
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "safety_identifier": self.safety_identifier,
            "service_tier": self.service_tier or "default",
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "text": self.text.echo() if self.text is not None else {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": {"type": "function", "name": name} if mode == "function" else mode,
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


class StoredResponse(BaseModel):
    """What is kept of a request in the response's hash: everything the
    Response object repeats, the input items as listed, and the job (to
    send it again). Its answer lives in the response's events stream."""

    model_config = ConfigDict(extra="forbid")

    id: str
    created_at: int
    model: str
    background: bool
    store: bool
    echo: dict[str, Any] = Field(description="the request's fields as the Response object repeats them")
    input_items: list[dict[str, Any]]
    job: Job
    context_start: int = Field(description="job.messages from here on are the conversation (before: instructions)")
    api_key: str | None = Field(default=None, description="the name of the API key that asked, for its token count")

    def conversation(self) -> list[Message]:
        """The messages a next turn continues: this turn's history and
        input, less the instructions (OpenAI does not carry them over)."""
        return [m.model_copy(deep=True) for m in (self.job.messages or [])[self.context_start:]]
