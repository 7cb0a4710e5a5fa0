"""What travels between API and workers: the job (a Celery task argument),
the events a worker publishes on the API's reply channel, and the heartbeat a
worker writes into the registry. All JSON, all versioned, extra fields refused
so a mismatch between versions fails loudly instead of silently."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
ModelKind = Literal["chat", "embedding"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------- jobs


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="a JSON object, as text (OpenAI's shape)")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant turns that called tools")
    tool_call_id: str | None = Field(default=None, description="tool turns: the call this answers")


class Function(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="JSON schema of the arguments")
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: Function


class Constraint(Strict):
    """What every choice's output must match, enforced token by token by a
    grammar in the engine (worker/grammar.py)."""

    kind: Literal["json", "regex", "choice", "grammar"]
    json_schema: dict[str, Any] | None = Field(default=None, description="kind json; None: any JSON object")
    pattern: str | None = Field(default=None, description="kind regex")
    choices: list[str] | None = Field(default=None, description="kind choice: exactly one of these strings")
    ebnf: str | None = Field(default=None, description="kind grammar: an EBNF grammar with a root rule")
    param: str = Field(default="response_format", description="the request field it came from, for errors")


class Sampling(Strict):
    """How each choice of a job picks its tokens (worker/sampler.py)."""

    max_tokens: int | None = Field(default=None, ge=1, description="None: up to the context length")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, description="-1 or 0: off")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    seed: int | None = Field(default=None, description="choice i samples with seed + i")
    logprobs: int | None = Field(default=None, ge=0, le=20,
                                 description="None: no logprobs; k: the chosen token's and the top k")


class Job(Strict):
    v: int = SCHEMA_VERSION
    job_id: str
    model: str
    kind: Literal["chat", "completion", "embedding"]
    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    inputs: list[str] | list[list[int]] | None = Field(default=None, description="embedding jobs")
    sampling: Sampling = Sampling()
    n: int = Field(default=1, ge=1, description="independent choices")
    stop: list[str] = Field(default_factory=list, description="never emitted; generation ends before them")
    echo: bool = Field(default=False, description="completions: the prompt text comes first")
    constraint: Constraint | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required", "function"] = "auto"
    tool_name: str | None = Field(default=None, description="tool_choice function: the function it must call")
    parallel_tool_calls: bool = True
    reply_channel: str
    submitted_at: float = Field(description="epoch seconds when the API enqueued the job")

    def summary(self) -> dict[str, object]:
        """What Flower may show about this job: never the prompt text."""
        if self.messages is not None:
            size = sum(len(m.content) for m in self.messages)
        elif self.inputs is not None:
            size = sum(len(i) for i in self.inputs)
        else:
            size = len(self.prompt) if self.prompt is not None else 0
        return {
            "job_id": self.job_id,
            "model": self.model,
            "kind": self.kind,
            "prompt_chars_or_tokens": size,
            "n": self.n,
            "constrained": self.constraint.kind if self.constraint else None,
            "tools": len(self.tools or ()),
            **self.sampling.model_dump(exclude={"logit_bias"}),
        }


# ------------------------------------------------------------------- events


class _Event(Strict):
    v: int = SCHEMA_VERSION
    job_id: str
    seq: int = Field(ge=0, description="per job, 0 for the first event")


class Started(_Event):
    type: Literal["started"] = "started"
    worker: str
    prompt_tokens: int
    queue_s: float


class TokenLogprob(Strict):
    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)


class ToolCallDelta(Strict):
    """A piece of one tool call: its first piece names it, the rest extend
    its arguments (OpenAI's streamed ``delta.tool_calls[]``)."""

    index: int = Field(description="which call of this choice")
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(_Event):
    type: Literal["delta"] = "delta"
    index: int = Field(default=0, description="which choice")
    text: str
    completion_tokens: int = Field(description="tokens of this choice generated so far")
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] | None = None


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(Strict):
    queue_s: float
    first_token_s: float | None
    total_s: float


class Done(_Event):
    """The end of one choice; a job ends when all its choices are done."""

    type: Literal["done"] = "done"
    index: int = 0
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class Error(_Event):
    type: Literal["error"] = "error"
    status: int = Field(description="HTTP status the API should answer with")
    error_type: str = Field(description="OpenAI error type, e.g. invalid_request_error")
    code: str | None = None
    param: str | None = None
    message: str


class Embeddings(_Event):
    """The whole answer of an embedding job."""

    type: Literal["embeddings"] = "embeddings"
    vectors: list[str] = Field(description="per input, base64 of little-endian float32")
    prompt_tokens: int


AnyEvent = Started | Delta | Done | Error | Embeddings
Event = Annotated[AnyEvent, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(Event)


def parse_event(raw: bytes | str) -> AnyEvent:
    return EVENT_ADAPTER.validate_json(raw)


# ----------------------------------------------------------------- registry


class ModelInfo(Strict):
    name: str
    queue: str
    context_length: int
    kind: ModelKind
    running: int = Field(default=0, description="this model's jobs running on the worker")


class Heartbeat(Strict):
    v: int = SCHEMA_VERSION
    worker_id: str
    engine: str = Field(default="transformers", description="transformers, vllm or llama.cpp")
    models: list[ModelInfo]
    device: str
    capacity: int = Field(description="jobs the worker runs at once (its batch cap)")
    running: int
    tokens_per_s: float
    step_s: float = Field(default=0.0, description="recent mean engine step time")
    version: str
    started_at: float
    beat_at: float
