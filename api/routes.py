"""Thin OpenAI routes: validate, hand over to the job service, shape the answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.deps import JobsDep, RegistryDep
from api.jobs import RunningJob
from api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from api.serving import ChatShape, CompletionShape, Shape, collect, stream

router = APIRouter(prefix="/v1")

JOB_ID_HEADER = "x-request-id"


@router.get("/models")
async def list_models(registry: RegistryDep) -> ModelList:
    live = await registry.live_models()
    cards = [
        ModelCard(
            id=name,
            created=int(min(w.started_at for w in m.workers)),
            kind=m.info.kind,
            context_length=m.info.context_length,
            workers=len(m.workers),
            capacity=m.capacity,
        )
        for name, m in live.items()
    ]
    return ModelList(data=cards)


async def _answer(run: RunningJob, shape: Shape, stream_it: bool, include_usage: bool, request: Request) -> Any:
    headers = {JOB_ID_HEADER: run.job_id}
    if stream_it:
        # sep="\n": OpenAI frames events as "data: {...}\n\n".
        return EventSourceResponse(stream(run, shape, include_usage), sep="\n", headers=headers)
    body = await collect(run, shape, request)
    return JSONResponse(body, headers=headers)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, jobs: JobsDep, request: Request) -> Any:
    run = await jobs.submit(
        model=body.model,
        kind="chat",
        messages=[m.to_message() for m in body.messages],
        sampling=body.sampling(body.max_new_tokens(), body.logprobs_wanted()),
        n=body.n,
        stop=body.stop_list(),
        id_prefix="chatcmpl",
    )
    return await _answer(run, ChatShape(), body.stream, body.include_usage, request)


@router.post("/completions")
async def completions(body: CompletionRequest, jobs: JobsDep, request: Request) -> Any:
    run = await jobs.submit(
        model=body.model,
        kind="completion",
        prompt=body.single_prompt(),
        sampling=body.sampling(body.max_tokens, body.logprobs),
        n=body.n,
        stop=body.stop_list(),
        echo=body.echo,
        id_prefix="cmpl",
    )
    return await _answer(run, CompletionShape(), body.stream, body.include_usage, request)
