"""OpenAI's request models for the completions routes: chat, text
completions, embeddings (their answers: ``objects.py``; structured outputs
and tools: ``structured.py``).

Requests forbid unknown fields (a typo gets a 400 naming it). Fields OpenAI
defines that the engine does not honour yet are declared, so the client gets
"not supported" for them rather than "unrecognized", and are refused when set
to anything but their neutral value: never accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from api.completions.structured import NamedToolChoice, ResponseFormat, StructuredOutputs, ToolFields, ToolIn
from api.errors import invalid, unsupported
from api.wire import GREEDY_BELOW_TEMPERATURE, TOOL_CHOICE_MODES, Request, ToolChoice, ToolChoiceMode
from broker.schemas import SERVICE_TIERS, Constraint, Message, Sampling, ToolCall
from broker.settings import Settings


class StreamOptions(Request):
    include_usage: bool = False


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant turns: the calls it made")
    tool_call_id: str | None = Field(default=None, description="tool turns: the call this result answers")

    def check(self, at: str) -> None:
        """Rules that tie fields to the role; ``at`` is this message's path ("messages.2")."""
        if self.role == "tool" and self.tool_call_id is None:
            raise invalid(f"{at}.tool_call_id", f"'{at}.tool_call_id' is required: a tool message answers one call.")
        if self.role != "tool" and self.tool_call_id is not None:
            raise invalid(f"{at}.tool_call_id", f"'{at}.tool_call_id' is only allowed on messages of role 'tool'.")
        if self.role != "assistant" and self.tool_calls:
            raise invalid(f"{at}.tool_calls", f"'{at}.tool_calls' is only allowed on messages of role 'assistant'.")

    def to_message(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        # An empty list means no calls, as OpenAI's clients treat it.
        return Message(role=role, content=text, tool_calls=self.tool_calls or None, tool_call_id=self.tool_call_id)


# Fields OpenAI defines and llmq refuses, with the value that means "off".
_REFUSED: dict[str, object] = {
    "functions": None,
    "function_call": None,
    "suffix": None,
    "best_of": None,
}
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
def _effective_temperature(temperature: float | None) -> float:
    if temperature is None:
        return 1.0
    return 0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature


class _Generation(Request):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="extension; -1 or 0: off")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = Field(default=None, description="vLLM's extension")
    service_tier: Literal["auto", "default", "flex", "priority"] | None = Field(
        default=None, description="flex waits behind default, priority goes before it (a kombu priority step)")

    @model_validator(mode="after")
    def _check(self) -> "_Generation":
        for name, off in _REFUSED.items():
            if name in self.model_fields_set and getattr(self, name, off) not in (off, None):
                raise unsupported(name, "The engine cannot honour it, so it is refused rather than ignored.")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
        stops = self.stop_list()
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise invalid("stop", f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings.")
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise invalid("logit_bias", f"'logit_bias' keys are token ids; {key!r} is not one.")
            if not -100 <= value <= 100:
                raise invalid("logit_bias", f"'logit_bias' values lie in [-100, 100]; got {value}.")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def constraint(self) -> Constraint | None:
        """What the output must match, enforced by the worker's grammar."""
        return self.structured_outputs.constraint() if self.structured_outputs is not None else None

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> Sampling:
        return Sampling(
            max_tokens=max_tokens,
            temperature=_effective_temperature(self.temperature),
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            seed=self.seed,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def priority(self) -> int:
        return SERVICE_TIERS[self.service_tier or "auto"]


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[ToolIn] | None = Field(default=None, min_length=1)
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None

    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_form(cls, value: Any) -> Any:
        # Checked here: pydantic's error for a union names the member
        # ("tool_choice.literal[...]"), not the field.
        if value is None or (isinstance(value, str) and value in TOOL_CHOICE_MODES):
            return value
        if isinstance(value, dict):
            try:
                return NamedToolChoice.model_validate(value)
            except ValidationError:
                pass
        raise invalid("tool_choice", "'tool_choice' is 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}.")

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
        for i, message in enumerate(self.messages):
            message.check(f"messages.{i}")
        self._check_tools()
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.structured_outputs is not None:
            raise invalid("response_format", "'response_format' and 'structured_outputs' both constrain the output; "
                          "send one of them.")
        constraint = self.constraint()
        if constraint is not None and self.tool_fields()["tool_choice"] != "none":
            raise invalid(constraint.param, f"'{constraint.param}' cannot be combined with 'tools' unless "
                          "'tool_choice' is 'none': tool calls are themselves constrained output, and both would "
                          "constrain the same text.")
        return self

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise invalid("tools", f"'tools' names each function once; {repeated[0]!r} appears more than once.")
        # "none" asks for nothing, so it is fine alone; OpenAI refuses any other choice without tools.
        if self.tools is None and self.tool_choice not in (None, "none"):
            raise invalid("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise invalid("tool_choice", f"'tool_choice' names the function {self.tool_choice.function.name!r}, "
                          "which is not one of 'tools'.")

    def constraint(self) -> Constraint | None:
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.constraint()
        return super().constraint()

    def tool_fields(self) -> ToolFields:
        """The job's tools and how it may use them; without tools it calls none."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            mode: ToolChoice = "function"
            name: str | None = choice.function.name
        else:
            mode = choice or ("auto" if self.tools else "none")
            name = None
        return ToolFields(tools=[t.to_tool() for t in self.tools] if self.tools else None, tool_choice=mode,
                          tool_name=name, parallel_tool_calls=self.parallel_tool_calls is not False)

    def check_limits(self, settings: Settings) -> None:
        """Limits each deployment sets, which a static model cannot hold."""
        if len(self.messages) > settings.max_messages:
            raise invalid("messages", f"'messages' holds {len(self.messages)} messages; this server takes at most "
                          f"{settings.max_messages} (LLMQ_MAX_MESSAGES).")

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def job_fields(self) -> dict[str, Any]:
        """What the job carries of this request (the routes, batch lines)."""
        return dict(kind="chat", messages=[m.to_message() for m in self.messages],
                    sampling=self.sampling(self.max_new_tokens(), self.logprobs_wanted()), n=self.n,
                    stop=self.stop_list(), constraint=self.constraint(), priority=self.priority(),
                    **self.tool_fields())

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not all(isinstance(x, int) for x in p):
            if len(p) > 1:
                raise unsupported("prompt", "Send one prompt per request; several in one request are not supported yet.")
            p = p[0]
        # The engine needs at least one token to continue from.
        if len(p) == 0:
            raise invalid("prompt", "'prompt' must not be empty: an empty string or token list gives the model "
                          "nothing to continue.")
        return p if isinstance(p, str) else list(p)  # type: ignore[arg-type]

    def job_fields(self) -> dict[str, Any]:
        """What the job carries of this request (the routes, batch lines)."""
        return dict(kind="completion", prompt=self.single_prompt(), sampling=self.sampling(self.max_tokens, self.logprobs),
                    n=self.n, stop=self.stop_list(), echo=self.echo, constraint=self.constraint(),
                    priority=self.priority())


# ------------------------------------------------------------- embeddings


class EmbeddingRequest(Request):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingRequest":
        if self.dimensions is not None:
            raise unsupported("dimensions", "The model's embeddings have one fixed size.")
        return self

    def inputs(self) -> list[str] | list[list[int]]:
        x = self.input
        if isinstance(x, str):
            items: list[str] | list[list[int]] = [x]
        elif x and all(isinstance(i, int) for i in x):
            items = [list(x)]  # type: ignore[list-item]
        else:
            items = list(x)  # type: ignore[assignment]
        if not items or any(len(i) == 0 for i in items):
            raise invalid("input", "'input' must not be empty, nor contain an empty string or token list.")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise invalid("input", f"'input' takes at most {MAX_EMBEDDING_INPUTS} items per request.")
        return items


MAX_EMBEDDING_INPUTS = 2048




class TokenCheckItem(Request):
    """One prompt of FastChat's ``/api/v1/token_check``."""

    model: str
    prompt: str
    max_tokens: int = Field(ge=0, description="the answer's tokens the context must also hold")


class TokenCheckRequest(Request):
    prompts: list[TokenCheckItem] = Field(min_length=1, max_length=64)
