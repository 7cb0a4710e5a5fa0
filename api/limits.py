"""Request size limit: a body larger than ``settings.max_body_bytes`` gets a
413 in OpenAI's error shape before any route sees it.

A pure ASGI middleware rather than a check in the routes, because the routes
only see the body after FastAPI has read and parsed all of it. A declared
``Content-Length`` over the limit is refused without reading a byte; a body
without one (chunked) is counted as it arrives and refused as soon as it
passes the limit. A body within the limit is handed on as one message, so
the app reads it as usual, and later ``receive`` calls (disconnects) pass
straight through.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError
from broker.settings import Settings

log = logging.getLogger("llmq.api")


def too_large(limit: int, size: int, declared: bool) -> APIError:
    got = f"{size} bytes" if declared else f"more than {limit} bytes so far"
    return APIError(413, f"The request body is too large ({got}); this server takes at most {limit} bytes.",
                    code="request_too_large")


# A multipart upload's own framing (boundaries, part headers) on top of the file.
MULTIPART_OVERHEAD = 64 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes  # POST /v1/files (api/batches/files.py checks the file itself)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/files"
        limit = self.max_upload_bytes + MULTIPART_OVERHEAD if upload else self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, too_large(limit, declared, declared=True))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left mid-body: the app sees the disconnect
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, too_large(limit, size, declared=False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
        log.info("413 %s %s: %s", scope.get("method"), scope.get("path"), error.message)
        app = scope.get("app")
        metrics = getattr(getattr(app, "state", None), "metrics", None)
        if metrics is not None:
            metrics.observe_error(error.status, error.code)
        # The rest of the body is left unread; the server skips it and keeps the
        # connection, so a client still sending gets to read this answer.
        await error.response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # the server refuses a malformed Content-Length itself


def install(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.files_max_bytes)
