"""OpenAI's Responses API (``/v1/responses``): thin routes over the
responses service (``api/responses/service.py``).

A stream (``stream: true``, or ``GET ?stream=true&starting_after=N``) sends
OpenAI's events as ``event: <type>`` / ``data: <json>`` pairs, each with its
``sequence_number``, and ends after the terminal event (no ``[DONE]``, as
OpenAI). The numbers are the same on every API process, so a client that
lost its connection resumes anywhere with ``starting_after`` the last number
it got.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.auth import require_api_key
from api.jobs.waiting import max_queue_s
from api.errors import ERROR_RESPONSES, unsupported
from api.jobs.hangup import CancelOnHangUp
from api.jobs.lifecycle import JOB_ID_HEADER
from api.responses.events import ResponseFold
from api.responses.protocol import ResponseCreateRequest, StoredResponse
from api.responses.service import Follow, ResponseGone, Responses, error_of
from api.sse import TokenStream

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


async def _responses(request: Request) -> Responses:
    return request.app.state.responses  # type: ignore[no-any-return]


ResponsesDep = Annotated[Responses, Depends(_responses)]
MAX_PAGE = 100


def _sse(event: dict[str, Any]) -> dict[str, str]:
    return {"event": event["type"], "data": json.dumps(event, separators=(",", ":"))}


async def _stream(responses: Responses, record: StoredResponse, head: list[dict[str, Any]],
                  follow: Follow | None, after: int,
                  state: ResponseFold | None, give_up: bool) -> AsyncIterator[dict[str, str]]:
    """The events numbered past ``after``: ``head`` (already folded), then
    the rest as ``follow`` brings them. With ``give_up``, a client that
    leaves before the end lets go of a response nobody else can read."""
    try:
        for event in head:
            if event["sequence_number"] > after:
                yield _sse(event)
        if follow is not None:
            async for state, events in follow:
                for event in events:
                    if event["sequence_number"] > after:
                        yield _sse(event)
    except ResponseGone:
        seq = state.seq if state is not None else 0
        yield _sse({"type": "error", "code": "response_not_found", "param": None, "sequence_number": seq,
                    "message": f"Response with id '{record.id}' was deleted while it was streamed."})
    finally:
        if follow is not None:
            await follow.aclose()
        if give_up and state is not None:
            await asyncio.shield(responses.give_up(record, state))


def _sse_response(events: AsyncIterator[dict[str, str]], record: StoredResponse) -> TokenStream:
    # sep="\n": OpenAI frames events as "event: ...\ndata: {...}\n\n".
    return TokenStream(events, sep="\n", headers={JOB_ID_HEADER: record.id})


@router.post("/responses")
async def create(body: ResponseCreateRequest, responses: ResponsesDep, request: Request) -> Any:
    key = getattr(request.state, "api_key", None)
    record = await responses.create(body, key, max_queue_s(request.headers, key, request.app.state.settings))
    headers = {JOB_ID_HEADER: record.id}
    if record.background:
        if body.stream:
            return _sse_response(_stream(responses, record, [], responses.follow(record), -1, None, False), record)
        return JSONResponse(ResponseFold(record).response(), headers=headers)
    # Not background: the answer waits for the worker, so an error found
    # before it starts (context too long, no worker took it) is an HTTP error.
    async with CancelOnHangUp(request.receive):
        state, head, follow = await responses.wait(record, started=body.stream)
    if state.status == "failed" and (not body.stream or state.worker is None):
        raise error_of(state)
    if not body.stream:
        return JSONResponse(state.response(), headers=headers)
    return _sse_response(_stream(responses, record, head, follow, -1, state, True), record)


@router.get("/responses/{response_id}")
async def retrieve(response_id: str, responses: ResponsesDep, stream: bool = False,
                   starting_after: Annotated[int | None, Query(ge=-1)] = None,
                   include: Annotated[list[str] | None, Query()] = None,
                   include_obfuscation: bool | None = None) -> Any:
    if include:
        raise unsupported("include", "No extra output data can be included.")
    if include_obfuscation:
        raise unsupported("include_obfuscation", "Stream events carry no obfuscation padding.")
    record = await responses.store.visible(response_id)
    if not stream:
        if starting_after is not None:
            raise unsupported("starting_after", "'starting_after' is only allowed with 'stream': true.")
        return JSONResponse((await responses.state(record)).response())
    after = -1 if starting_after is None else starting_after
    return _sse_response(_stream(responses, record, [], responses.follow(record), after, None, False), record)


@router.post("/responses/{response_id}/cancel")
async def cancel(response_id: str, responses: ResponsesDep) -> Any:
    return JSONResponse(await responses.cancel(response_id))


@router.delete("/responses/{response_id}")
async def delete(response_id: str, responses: ResponsesDep) -> Any:
    return JSONResponse(await responses.delete(response_id))


@router.get("/responses/{response_id}/input_items")
async def input_items(response_id: str, responses: ResponsesDep,
                      limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
                      order: Literal["asc", "desc"] = "desc", after: str | None = None,
                      include: Annotated[list[str] | None, Query()] = None) -> Any:
    if include:
        raise unsupported("include", "No extra item data can be included.")
    record = await responses.store.visible(response_id)
    items = record.input_items if order == "asc" else list(reversed(record.input_items))
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})
