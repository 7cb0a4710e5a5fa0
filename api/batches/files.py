"""OpenAI's Files API (``/v1/files``), the input and output of batches.

A file lives in Redis under llmq's prefix, one hash per file (its metadata
as JSON and its bytes), with a TTL (``LLMQ_FILES_TTL_S``), so every API
process serves every file and none outlives its keep time. A sorted set of
ids by creation time backs the listing; ids whose file expired are pruned
from it as they are met. A file over ``LLMQ_FILES_MAX_BYTES`` is a 413.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Literal

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from api.auth import require_api_key
from api.errors import ERROR_RESPONSES, APIError, invalid
from broker.keys import Keys
from broker.settings import Settings

log = logging.getLogger("llmq.api.batches.files")

PURPOSES = ("batch",)  # what a client may upload: the files llmq has a use for
BATCH_OUTPUT = "batch_output"  # a batch's output and error files, written by llmq (api/batches/keeper.py)
READ_CHUNK = 1024 * 1024
LIST_BATCH = 100  # file metadata read per round trip when listing


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


class FileStore:
    def __init__(self, r: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self._redis = r
        self._keys = keys
        self._ttl_s = settings.files_ttl_s
        self.max_bytes = settings.files_max_bytes

    async def put(self, content: bytes, filename: str, purpose: str, file_id: str | None = None) -> FileObject:
        """Store a file under a new id, or under ``file_id`` (replacing what
        it held: a batch's result files are written again, not twice, when
        a finalization is redone)."""
        clock = time.time()  # the index's order: finer than created_at's seconds
        now = int(clock)
        meta = FileObject(id=file_id or new_file_id(), bytes=len(content), created_at=now,
                          expires_at=now + self._ttl_s, filename=filename, purpose=purpose)
        key = self._keys.file(meta.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"meta": meta.model_dump_json(), "content": content})
            pipe.expire(key, self._ttl_s)
            pipe.zadd(self._keys.files(), {meta.id: clock})
            await pipe.execute()
        return meta

    async def meta(self, file_id: str) -> FileObject:
        raw = await self._redis.hget(self._keys.file(file_id), "meta")
        if raw is None:
            raise not_found(file_id)
        return FileObject.model_validate_json(raw)

    async def content(self, file_id: str) -> bytes:
        raw = await self._redis.hget(self._keys.file(file_id), "content")
        if raw is None:
            raise not_found(file_id)
        return bytes(raw)

    async def delete(self, file_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.file(file_id))
            pipe.zrem(self._keys.files(), file_id)
            deleted, _ = await pipe.execute()
        if not deleted:
            raise not_found(file_id)

    async def list(self, limit: int, after: str | None, purpose: str | None, newest_first: bool) -> FileList:
        """A page of files after ``after`` (an id), newest first unless asked otherwise."""
        ids = [i.decode() for i in await self._redis.zrange(self._keys.files(), 0, -1, desc=newest_first)]
        if after is not None:
            if after not in ids:
                raise invalid("after", f"'after' names no file: {after}")
            ids = ids[ids.index(after) + 1:]
        page: list[FileObject] = []
        gone: list[str] = []
        # The metadata in batches of one round trip each, until the page (and one more) is full.
        for start in range(0, len(ids), LIST_BATCH):
            batch = ids[start:start + LIST_BATCH]
            async with self._redis.pipeline(transaction=False) as pipe:
                for file_id in batch:
                    pipe.hget(self._keys.file(file_id), "meta")
                raws = await pipe.execute()
            for file_id, raw in zip(batch, raws):
                if raw is None:
                    gone.append(file_id)  # expired: its index entry goes too
                    continue
                meta = FileObject.model_validate_json(raw)
                if purpose is None or meta.purpose == purpose:
                    page.append(meta)
            if len(page) > limit:
                break
        if gone:
            await self._redis.zrem(self._keys.files(), *gone)
        more = len(page) > limit
        page = page[:limit]
        return FileList(data=page, has_more=more, first_id=page[0].id if page else None,
                        last_id=page[-1].id if page else None)


async def _store(request: Request) -> FileStore:
    return request.app.state.files  # type: ignore[no-any-return]


StoreDep = Annotated[FileStore, Depends(_store)]
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@router.post("/files", response_model=FileObject)
async def upload(store: StoreDep, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> FileObject:
    if purpose not in PURPOSES:
        raise invalid("purpose", f"'purpose' must be one of {', '.join(PURPOSES)}; got {purpose!r}.")
    chunks, size = [], 0
    while chunk := await file.read(READ_CHUNK):
        size += len(chunk)
        if size > store.max_bytes:
            raise APIError(413, f"The file is larger than this server keeps ({store.max_bytes} bytes, "
                           "LLMQ_FILES_MAX_BYTES).", param="file", code="file_too_large")
        chunks.append(chunk)
    meta = await store.put(b"".join(chunks), file.filename or "upload", purpose)
    log.info("file %s stored: %s, %d bytes, purpose %s", meta.id, meta.filename, meta.bytes, purpose)
    return meta


@router.get("/files", response_model=FileList)
async def list_files(store: StoreDep, purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                     after: str | None = None, order: Literal["asc", "desc"] = "desc") -> FileList:
    return await store.list(limit, after, purpose, newest_first=order == "desc")


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve(file_id: str, store: StoreDep) -> FileObject:
    return await store.meta(file_id)


@router.get("/files/{file_id}/content")
async def content(file_id: str, store: StoreDep) -> Response:
    return Response(await store.content(file_id), media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete(file_id: str, store: StoreDep) -> FileDeleted:
    await store.delete(file_id)
    log.info("file %s deleted", file_id)
    return FileDeleted(id=file_id)

