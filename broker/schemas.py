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
    """How each choice of a job picks its tokens (worker/engines/transformers/sampler.py)."""

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


# Kombu's Redis transport keeps one list per priority step of a queue and
# asks Redis for the lists of every queue, step by step, lowest number first:
# any job waiting at a lower number goes before any at a higher one, on every
# queue a worker consumes. OpenAI's service tiers map onto its default steps
# (0, 3, 6, 9); batch lines take the last.
SERVICE_TIERS: dict[str, int] = {"priority": 0, "default": 3, "auto": 3, "flex": 6}
DEFAULT_PRIORITY = SERVICE_TIERS["default"]
BATCH_PRIORITY = 9


def tier_of(priority: int) -> str:
    """The ``service_tier`` an answer echoes (a batch line's is the default tier's)."""
    return {0: "priority", 6: "flex"}.get(priority, "default")


class BatchLine(Strict):
    """Which line of which batch a job is. Its events are not published: the
    worker keeps them and stores the line's result once, at its end
    (``broker/batches.py``), since nobody listens to a batch."""

    batch_id: str
    index: int = Field(ge=0, description="the line's position in the input file, from 0")
    custom_id: str
    expires_at: float = Field(description="epoch seconds: a line not started by then is not run")


class AdapterEntry(Strict):
    """A LoRA adapter loaded through the API (``POST /v1/load_lora_adapter``):
    every worker of ``base`` serves it as model ``name``."""

    name: str
    base: str = Field(description="the served name of the base model")
    path: str = Field(description="the adapter directory, as the workers see it")
    added_at: float


class Share(Strict):
    """Whose job this is, for fair share between API keys (``broker/fairness.py``)."""

    tenant: str = Field(description="the API key's name, or 'anonymous'")
    weight: float = Field(default=1.0, gt=0)
    estimate: int = Field(ge=0, description="tokens charged when the job is taken, settled at its end")


class Job(Strict):
    v: int = SCHEMA_VERSION
    job_id: str
    model: str
    # count: the prompt's tokens, no generation; adapter: check a LoRA adapter for this base, nothing runs
    kind: Literal["chat", "completion", "embedding", "count", "adapter"]
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
    reply_channel: str = Field(description="the API's channel for its events; empty for a batch line")
    submitted_at: float = Field(description="epoch seconds when the API enqueued the job")
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9, description="kombu priority: 0 goes first")
    batch: BatchLine | None = None
    events_stream: str | None = Field(
        default=None, description="a Redis stream the worker also appends each event to (XADD, entry field "
        "'event'), so a client can resume from any API process (/v1/responses)")
    share: Share | None = Field(default=None, description="fair share: None, first come first served")
    adapter: AdapterEntry | None = Field(default=None, description="kind adapter: the adapter to check")
    queue: str | None = Field(default=None, description="the queue it was sent on when not its model's own: a "
                              "LoRA adapter's job sent to its base's queue (no worker holding it had room)")
    max_queue_s: float | None = Field(
        default=None, gt=0, description="how long the job may wait in its queue from submitted_at; past it, it is "
        "dropped before any engine work (x-llmq-max-queue-time, a key's or the server's default; a batch line: "
        "its batch's window)")

    def queue_deadline(self) -> float | None:
        """Epoch seconds after which the job, if still queued, is dropped."""
        return None if self.max_queue_s is None else self.submitted_at + self.max_queue_s

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
            "priority": self.priority,
            **({"key": self.share.tenant} if self.share else {}),
            **({"max_queue_s": self.max_queue_s} if self.max_queue_s else {}),
            **({"batch_id": self.batch.batch_id, "custom_id": self.batch.custom_id} if self.batch else {}),
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


class TokenCount(_Event):
    """The whole answer of a count job: the prompt's tokens with the model's
    own tokenizer (and chat template, for messages)."""

    type: Literal["token_count"] = "token_count"
    prompt_tokens: int
    context_length: int


class AdapterChecked(_Event):
    """The whole answer of an adapter job: the worker read the adapter and it
    fits the base; ``modules`` is how many layers it trains."""

    type: Literal["adapter_checked"] = "adapter_checked"
    rank: int
    modules: int


AnyEvent = Started | Delta | Done | Error | Embeddings | TokenCount | AdapterChecked
Event = Annotated[AnyEvent, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(Event)
EVENTS_ADAPTER: TypeAdapter[list[AnyEvent]] = TypeAdapter(list[Event])


# The field of an entry that holds an event in a job's events stream
# (Job.events_stream): written by the worker, read by the API.
STREAM_EVENT_FIELD = "event"


def parse_event(raw: bytes | str) -> AnyEvent:
    return EVENT_ADAPTER.validate_json(raw)


def parse_message(raw: bytes | str) -> list[AnyEvent]:
    """A reply channel's message: one event, or a JSON array of the events
    of one engine step bound for the same API process (``events_message``)."""
    if raw[:1] in (b"[", "["):
        return EVENTS_ADAPTER.validate_json(raw)
    return [EVENT_ADAPTER.validate_json(raw)]


def events_message(events_json: list[str]) -> str:
    """Events already in JSON, as one reply channel message: one PUBLISH and
    one message to parse for a whole step's tokens, whatever the batch size."""
    return events_json[0] if len(events_json) == 1 else "[" + ",".join(events_json) + "]"


class LineResult(Strict):
    """What a batch line left, stored once per line (``broker/batches.py``):
    the events its job would have published, in order and merged per choice
    (a Delta then a Done per choice, or one Embeddings, or one Error); or,
    for a line that never ran, why (``skipped``)."""

    v: int = SCHEMA_VERSION
    index: int
    custom_id: str
    job_id: str
    events: list[Event] = Field(default_factory=list)
    skipped: Literal["batch_cancelled", "batch_expired"] | None = None
    finished_at: float

    @property
    def failed(self) -> bool:
        return self.skipped is not None or any(isinstance(ev, Error) for ev in self.events)


# ----------------------------------------------------------------- registry


class ModelInfo(Strict):
    name: str
    queue: str
    context_length: int
    kind: ModelKind
    running: int = Field(default=0, description="this model's jobs running on the worker")
    jobs_per_s: float = Field(default=0.0, description="jobs of this model the worker finished per second "
                              "(10 s window): its share of the queue's drain rate")
    parent: str | None = Field(default=None, description="a LoRA adapter's base model (served name)")
    resident: bool = Field(default=True, description="a LoRA adapter: its weights are in one of the worker's slots")
    loads: int = Field(default=0, description="a LoRA adapter: times the worker loaded it into a slot")


class DeclaredModel(Strict):
    """A model the operator says exists even while no worker serves it
    (``LLMQ_MODELS``): its requests may wait for a worker to start."""

    name: str = Field(min_length=1)
    kind: ModelKind = "chat"
    context_length: int = Field(gt=0)


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
