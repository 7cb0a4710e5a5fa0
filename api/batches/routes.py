"""OpenAI's Batch API (``/v1/batches``): thin routes over the batch store.

A batch lives in Redis (``api/batches/store.py``), so every API process
answers for every batch and a batch outlives the process that accepted it;
each process's keeper (``api/batches/keeper.py``) moves open batches along,
and the lines themselves run on workers at the lowest priority.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api.auth import require_api_key
from api.batches.files import PURPOSES
from api.batches.files import StoreDep as FilesDep
from api.batches.keeper import BatchKeeper
from api.batches.store import Batch, BatchCreateRequest, BatchList, BatchStore
from api.errors import ERROR_RESPONSES, APIError

log = logging.getLogger("llmq.api.batches.routes")


async def _store(request: Request) -> BatchStore:
    return request.app.state.batches  # type: ignore[no-any-return]


async def _keeper(request: Request) -> BatchKeeper:
    return request.app.state.batch_keeper  # type: ignore[no-any-return]


StoreDep = Annotated[BatchStore, Depends(_store)]
KeeperDep = Annotated[BatchKeeper, Depends(_keeper)]
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@router.post("/batches", response_model=Batch)
async def create(body: BatchCreateRequest, store: StoreDep, keeper: KeeperDep, files: FilesDep) -> Batch:
    try:
        meta = await files.meta(body.input_file_id)
    except APIError as exc:
        raise APIError(404, exc.message, param="input_file_id", code=exc.code) from None
    if meta.purpose not in PURPOSES:
        raise APIError(400, f"The file {meta.id} has purpose '{meta.purpose}'; a batch's input file is uploaded with "
                       "purpose 'batch'.", param="input_file_id", code="invalid_value")
    batch = await store.create(body)
    keeper.kick()
    log.info("batch %s created: %s on %s (%d bytes)", batch.id, body.endpoint, meta.id, meta.bytes)
    return batch


@router.get("/batches", response_model=BatchList)
async def list_batches(store: StoreDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> BatchList:
    return await store.page(limit, after)


@router.get("/batches/{batch_id}", response_model=Batch)
async def retrieve(batch_id: str, store: StoreDep) -> Batch:
    return await store.get(batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel(batch_id: str, store: StoreDep, keeper: KeeperDep) -> Batch:
    batch = await store.cancel(batch_id)
    keeper.kick()
    log.info("batch %s cancelling (%d of %d requests ended)", batch_id,
             batch.request_counts.completed + batch.request_counts.failed, batch.request_counts.total)
    return batch
