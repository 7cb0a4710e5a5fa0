"""Thin OpenAI routes: validate, hand over to the job service, shape the answer."""

from __future__ import annotations

import asyncio
import base64
import time
from array import array
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.auth import require_api_key
from api.completions.answers import ChatShape, CompletionShape, Shape, collect, stream
from api.completions.objects import (
    ChatCompletion,
    Completion,
    EmbeddingData,
    EmbeddingList,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    TokenCheckResponse,
    TokenCheckResult,
)
from api.completions.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    TokenCheckItem,
    TokenCheckRequest,
)
from api.deps import InteractiveDep, RegistryDep
from api.errors import ERROR_RESPONSES, validation_error
from api.jobs.hangup import CancelOnHangUp
from api.jobs.interactive import RunningJob, new_job_id
from api.jobs.lifecycle import JOB_ID_HEADER
from api.jobs.waiting import max_queue_s
from api.keys import NamedKey
from api.sse import TokenStream
from broker.schemas import Job

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
# FastChat's own API beside OpenAI's (its clients call /api/v1/token_check).
fastchat_router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


def _key(request: Request) -> NamedKey | None:
    """The caller's key, as require_api_key matched it (None: the API is open)."""
    return getattr(request.state, "api_key", None)


@router.get("/models")
async def list_models(registry: RegistryDep, request: Request) -> ModelList:
    """Models with a live worker, and the declared ones (LLMQ_MODELS) that
    have none now: their requests wait for a worker to start."""
    live = await registry.live_models()
    cards = [
        ModelCard(
            id=name,
            created=int(min(w.started_at for w in m.workers)),
            kind=m.info.kind,
            context_length=m.info.context_length,
            workers=len(m.workers),
            capacity=m.capacity,
            parent=m.info.parent,
        )
        for name, m in live.items()
    ]
    cards += [ModelCard(id=m.name, created=0, kind=m.kind, context_length=m.context_length, workers=0, capacity=0)
              for m in request.app.state.settings.models if m.name not in live]
    return ModelList(data=cards)


def _job(body: ChatCompletionRequest | CompletionRequest | EmbeddingRequest, id_prefix: str,
         request: Request) -> Job:
    """The job a request asks for, as batch lines build it too (``api/batches/lines.py``),
    with how long it may wait in the queue (``api/jobs/waiting.py``)."""
    fields = {"kind": "embedding", "inputs": body.inputs()} if isinstance(body, EmbeddingRequest) else body.job_fields()
    wait = max_queue_s(request.headers, _key(request), request.app.state.settings)
    try:
        return Job(job_id=new_job_id(id_prefix), model=body.model, **fields, reply_channel="",
                   submitted_at=time.time(), max_queue_s=wait)
    except ValidationError as exc:  # a value the request model let through and the job's does not
        raise validation_error(exc.errors()) from None


async def _answer(run: RunningJob, shape: Shape, stream_it: bool, include_usage: bool, request: Request) -> Any:
    headers = {JOB_ID_HEADER: run.job_id}
    if stream_it:
        # sep="\n": OpenAI frames events as "data: {...}\n\n".
        return TokenStream(stream(run, shape, include_usage), sep="\n", headers=headers)
    async with CancelOnHangUp(request.receive):
        body = await collect(run, shape)
    return JSONResponse(body, headers=headers)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, jobs: InteractiveDep, request: Request) -> Any:
    body.check_limits(request.app.state.settings)
    job = _job(body, "chatcmpl", request)
    async with CancelOnHangUp(request.receive):  # a job left in the queue is skipped
        run = await jobs.submit(job, api_key=_key(request))
    return await _answer(run, ChatShape(), body.stream, body.include_usage, request)


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, jobs: InteractiveDep, request: Request) -> Any:
    job = _job(body, "cmpl", request)
    async with CancelOnHangUp(request.receive):  # a job left in the queue is skipped
        run = await jobs.submit(job, api_key=_key(request))
    return await _answer(run, CompletionShape(), body.stream, body.include_usage, request)


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, jobs: InteractiveDep, request: Request) -> EmbeddingList:
    result = await jobs.embed(_job(body, "embd", request), api_key=_key(request))
    if body.encoding_format == "base64":
        vectors: list[list[float] | str] = list(result.vectors)  # already little-endian float32, as OpenAI sends
    else:
        vectors = [array("f", base64.b64decode(v)).tolist() for v in result.vectors]
    return EmbeddingList(
        data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )


@router.post("/engines/{model}/embeddings", include_in_schema=False)
async def engine_embeddings(model: str, body: dict[str, Any], jobs: InteractiveDep, request: Request) -> EmbeddingList:
    """FastChat's older path: the model comes from the URL."""
    try:
        parsed = EmbeddingRequest.model_validate({**body, "model": model})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return await embeddings(parsed, jobs, request)


@fastchat_router.post("/token_check")
async def token_check(body: TokenCheckRequest, jobs: InteractiveDep) -> TokenCheckResponse:
    """FastChat's check: does each prompt, with ``max_tokens`` more, fit its
    model's context? Counted by a worker of the model, with its tokenizer."""

    async def check(item: TokenCheckItem) -> TokenCheckResult:
        job = Job(job_id=new_job_id("count"), model=item.model, kind="count", prompt=item.prompt, reply_channel="",
                  submitted_at=time.time())
        counted = await jobs.count(job)
        return TokenCheckResult(fits=counted.prompt_tokens + item.max_tokens <= counted.context_length,
                                tokenCount=counted.prompt_tokens, contextLength=counted.context_length)

    return TokenCheckResponse(prompts=list(await asyncio.gather(*(check(item) for item in body.prompts))))
