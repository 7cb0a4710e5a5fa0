"""A batch's lines: the input file parsed and checked, each line turned into
the job its body asks for (or refused as the same request sent alone would
be), and each line's stored result written as a line of OpenAI's output or
error file.

Everything here is pure and deterministic (the ids of a line's job and
request derive from the batch id and the line's index), so a keeper that
takes a batch over after another API process died rebuilds exactly what
that one had.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.batches.store import CHAT, COMPLETIONS, EMBEDDINGS, Batch, BatchError
from api.completions.answers import ChatShape, CompletionShape, replay
from api.completions.objects import (
    EmbeddingData,
    EmbeddingList,
    EmbeddingUsage,
)
from api.completions.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from api.errors import APIError, error_from_event, unsupported, validation_error
from api.jobs.lifecycle import check_kind
from broker.schemas import BATCH_PRIORITY, BatchLine, Embeddings, Error, Job, LineResult, ModelInfo
from broker.settings import Settings

log = logging.getLogger("llmq.api.batches.routes")

MAX_PROBLEMS = 100  # structural problems reported per input file: enough to fix many at once
LINE_FIELDS = frozenset({"custom_id", "method", "url", "body"})
_REQUESTS: dict[str, type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest]] = {
    CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest, EMBEDDINGS: EmbeddingRequest}
_ID_PREFIX = {CHAT: "chatcmpl", COMPLETIONS: "cmpl", EMBEDDINGS: "embd"}  # as the routes name their answers
SKIPPED = {
    "batch_cancelled": "The batch was cancelled before this request ran.",
    "batch_expired": "The batch expired (its completion window ended) before this request ran.",
}


@dataclass(frozen=True)
class InputLine:
    index: int  # among the file's requests, from 0 (blank lines are not requests)
    line: int  # in the file, from 1
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineAnswer:
    """What ``replay`` names besides the choices (``api.completions.answers.Answered``)."""

    job_id: str
    created: int
    job: Job


def _line_uuid(batch_id: str, index: int, what: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"llmq:{batch_id}/{index}/{what}").hex


def job_id(batch: Batch, index: int) -> str:
    return f"{_ID_PREFIX[batch.endpoint]}-{_line_uuid(batch.id, index, 'job')}"


def request_id(batch_id: str, index: int) -> str:
    return f"batch_req_{_line_uuid(batch_id, index, 'request')}"


# ----------------------------------------------------------------- the input


def parse(content: bytes, endpoint: str, max_lines: int) -> tuple[list[InputLine], list[BatchError]]:
    """The requests of an input file, or what makes the whole file unusable
    (each naming its line); blank lines are skipped."""
    lines: list[InputLine] = []
    problems: list[BatchError] = []
    seen: dict[str, int] = {}
    requests = 0
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        requests += 1
        if requests > max_lines:
            problems.append(BatchError(code="too_many_tasks", line=number, message=(
                f"The file holds more than {max_lines} requests, the most one batch takes (LLMQ_BATCH_MAX_LINES); "
                "split it into several batches.")))
            break
        found = _check_line(raw, number, endpoint, seen)
        if isinstance(found, InputLine):
            lines.append(InputLine(index=len(lines), line=number, custom_id=found.custom_id, body=found.body))
        else:
            problems += found
        if len(problems) >= MAX_PROBLEMS:
            break
    if requests == 0:
        problems.append(BatchError(code="empty_file", message="The input file holds no requests."))
    return lines, problems[:MAX_PROBLEMS]


def _check_line(raw: bytes, number: int, endpoint: str, seen: dict[str, int]) -> InputLine | list[BatchError]:
    def bad(code: str, message: str, param: str | None = None) -> BatchError:
        return BatchError(code=code, message=message, param=param, line=number)

    try:
        item = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return [bad("invalid_json_line", "This line is not valid JSON (one JSON object per line, UTF-8).")]
    if not isinstance(item, dict):
        return [bad("invalid_json_line", f"This line is a JSON {type(item).__name__}, not an object.")]
    problems = [bad("invalid_request", f"Unrecognized field {k!r}: a line holds custom_id, method, url and body.",
                    param=k) for k in sorted(set(item) - LINE_FIELDS)]
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append(bad("missing_required_parameter", "'custom_id' must be a non-empty string.", "custom_id"))
    elif not _encodes(custom_id):
        problems.append(bad("invalid_request", "'custom_id' is not valid UTF-8 text.", "custom_id"))
    elif custom_id in seen:
        problems.append(bad("duplicate_custom_id", f"The custom_id {custom_id!r} is also on line {seen[custom_id]}; "
                            "each request needs its own.", "custom_id"))
    else:
        seen[custom_id] = number
    if item.get("method") != "POST":
        problems.append(bad("invalid_method", f"'method' must be 'POST', not {item.get('method')!r}.", "method"))
    if item.get("url") != endpoint:
        problems.append(bad("invalid_url", f"'url' is {item.get('url')!r}, but this batch's endpoint is {endpoint}; "
                            "every line must name it.", "url"))
    if not isinstance(item.get("body"), dict):
        problems.append(bad("invalid_request", "'body' must be a JSON object: the request as the endpoint takes it.",
                            "body"))
    if problems:
        return problems
    return InputLine(index=-1, line=number, custom_id=custom_id, body=item["body"])  # type: ignore[arg-type]


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------ the jobs


@dataclass(frozen=True)
class Prepared:
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest
    job: Job


def prepare(batch: Batch, line: InputLine, submitted_at: float, settings: Settings | None) -> Prepared:
    """The job a line asks for. Raises the APIError the route would answer
    the same body with (in the same order: the body, its limits when
    ``settings`` are given, then its fields); the registry is asked apart."""
    try:
        request = _REQUESTS[batch.endpoint].model_validate(line.body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    if isinstance(request, EmbeddingRequest):
        fields: dict[str, Any] = {"kind": "embedding", "inputs": request.inputs()}
    else:
        if request.stream:
            raise unsupported("stream", "A batch request's answer is one body in the output file.")
        if settings is not None and isinstance(request, ChatCompletionRequest):
            request.check_limits(settings)
        fields = request.job_fields()
    # A batch line waits behind every interactive job, whatever service_tier its body asked for.
    fields["priority"] = BATCH_PRIORITY
    line_of = BatchLine(batch_id=batch.id, index=line.index, custom_id=line.custom_id,
                        expires_at=float(batch.expires_at))
    try:
        job = Job(job_id=job_id(batch, line.index), model=request.model, **fields, reply_channel="",
                  submitted_at=submitted_at, batch=line_of)
    except ValidationError as exc:  # a value the request model let through and the job's does not: still the line's
        raise validation_error(exc.errors()) from None
    return Prepared(request=request, job=job)


def check_model(endpoint: str, model: str, info: ModelInfo | None) -> None:
    """A model no worker ever served, or of the wrong kind, as the route refuses it."""
    check_kind(model, info, "embedding" if endpoint == EMBEDDINGS else "chat")


def job_or_refusal(batch: Batch, line: InputLine, models: Mapping[str, ModelInfo | None], settings: Settings,
                   now: float) -> Job | LineResult:
    """The line's job, or its refusal as the result it stores at once."""
    try:
        prepared = prepare(batch, line, now, settings)
        check_model(batch.endpoint, prepared.job.model, models.get(prepared.job.model))
        return prepared.job
    except APIError as exc:
        error = Error(job_id=job_id(batch, line.index), seq=0, status=exc.status, error_type=exc.type,
                      code=exc.code, param=exc.param, message=exc.message)
        return LineResult(index=line.index, custom_id=line.custom_id, job_id=error.job_id, events=[error],
                          finished_at=now)


def jobs_or_refusals(batch: Batch, lines: list[InputLine], models: Mapping[str, ModelInfo | None],
                     settings: Settings, now: float) -> list[Job | LineResult]:
    return [job_or_refusal(batch, line, models, settings, now) for line in lines]


def model_names(lines: list[InputLine]) -> list[str]:
    return sorted({m for line in lines if isinstance(m := line.body.get("model"), str)})


# ---------------------------------------------------------------- the output


def render(batch: Batch, line: InputLine, result: LineResult) -> tuple[bool, str]:
    """The line's output-file line (True) or error-file line (False), in OpenAI's shape."""
    head: dict[str, Any] = {"id": request_id(batch.id, line.index), "custom_id": line.custom_id}
    if result.skipped is not None:
        return False, _dumps({**head, "response": None,
                              "error": {"code": result.skipped, "message": SKIPPED[result.skipped]}})
    try:
        failure = next((ev for ev in result.events if isinstance(ev, Error)), None)
        if failure is not None:
            raise error_from_event(failure)
        body = _body(batch, line, result)
    except APIError as exc:
        return False, _failed(head, result, exc)
    except Exception:  # a stored result this code cannot read: that line fails, not the whole batch
        log.exception("batch %s: the result of line %d (custom_id %r, job %s) cannot be rendered", batch.id,
                      line.line, line.custom_id, result.job_id)
        return False, _failed(head, result, APIError(500, "The server could not read this request's result.",
                                                     type="server_error"))
    return True, _dumps({**head, "response": {"status_code": 200, "request_id": result.job_id, "body": body},
                         "error": None})


def render_all(batch: Batch, lines: list[InputLine], results: list[LineResult]) -> list[tuple[bool, str]]:
    return [render(batch, line, result) for line, result in zip(lines, results, strict=True)]


def _body(batch: Batch, line: InputLine, result: LineResult) -> dict[str, Any]:
    """The body the route would have answered, rebuilt from the line's own request."""
    prepared = prepare(batch, line, result.finished_at, settings=None)
    request = prepared.request
    if isinstance(request, EmbeddingRequest):
        answer = next((ev for ev in result.events if isinstance(ev, Embeddings)), None)
        if answer is None:
            raise APIError(500, "The worker stored no embeddings for this request.", type="server_error")
        if request.encoding_format == "base64":
            vectors: list[list[float] | str] = list(answer.vectors)
        else:
            vectors = [array("f", base64.b64decode(v)).tolist() for v in answer.vectors]
        return EmbeddingList(data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
                             model=request.model, usage=EmbeddingUsage(prompt_tokens=answer.prompt_tokens,
                                                                       total_tokens=answer.prompt_tokens)).model_dump()
    answered = LineAnswer(job_id=result.job_id, created=int(result.finished_at), job=prepared.job)
    shape = ChatShape() if batch.endpoint == CHAT else CompletionShape()
    return replay(answered, shape, list(result.events))


def _failed(head: dict[str, Any], result: LineResult, exc: APIError) -> str:
    return _dumps({**head, "response": {"status_code": exc.status, "request_id": result.job_id, "body": exc.body()},
                   "error": None})


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))
