"""One error shape for every failure, OpenAI's:
``{"error": {"message", "type", "param", "code"}}``.

``APIError`` is raised anywhere in the API; the handlers here turn it, a
request validation failure and anything unexpected into that shape with the
right status and one log line an operator can act on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.schemas import Error

log = logging.getLogger("llmq.api")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# Every status but 200 carries OpenAI's error shape. Documented as "default",
# which also replaces FastAPI's 422 schema: validation errors are 400s here.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorResponse, "description": "An error in OpenAI's shape"},
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_from_event(ev: Error) -> APIError:
    """A worker's Error event, as the HTTP error the client gets."""
    return APIError(ev.status, ev.message, type=ev.error_type, code=ev.code, param=ev.param)


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist or no worker ever served it.", code="model_not_found", param="model"
    )


def wrong_model_kind(model: str, kind: str) -> APIError:
    """``kind``: what the model is (chat or embedding), which the route did not want."""
    route = "/v1/embeddings" if kind == "embedding" else "/v1/chat/completions or /v1/completions"
    return APIError(400, f"The model '{model}' is a {kind} model; use {route}.", param="model", code="wrong_model_kind")


def no_live_worker(model: str, waited_s: float | None = None, retry_after_s: int | None = None) -> APIError:
    waited = f" after waiting {waited_s:.0f} s for one" if waited_s is not None else ""
    return APIError(
        503,
        f"No live worker serves the model '{model}' right now{waited}; start one with `llmq worker --model-path ...`.",
        type="service_unavailable_error",
        code="no_live_worker",
        param="model",
        headers={"Retry-After": str(retry_after_s)} if retry_after_s is not None else None,
    )


def queue_full(model: str, depth: int, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"The queue for '{model}' is full ({depth} jobs waiting); retry after {retry_after_s} s.",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def max_queue_time_exceeded(model: str, waited_s: float, limit_s: float, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"The request waited {waited_s:.1f} s in the queue for '{model}', past its max queue time of {limit_s:g} s "
        f"(x-llmq-max-queue-time, the API key's or the server's default); nothing ran. Retry after {retry_after_s} s.",
        type="rate_limit_error",
        code="max_queue_time_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def unsupported(param: str, why: str = "") -> APIError:
    detail = f" {why}" if why else ""
    return APIError(400, f"'{param}' is not supported by this server.{detail}", code="unsupported_parameter", param=param)


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # pydantic puts the union member's type name in the path ("str", "list[...]"):
    # the user named the field, not the type.
    parts = [p for p in parts if not (p.startswith(("list[", "function-")) or p in ("str", "int", "float"))]
    return ".".join(parts) or None


def _count(request: Request, status: int, code: str | None) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_error(status, code)


def validation_error(problems: Sequence[Any]) -> APIError:
    """The 400 for a body pydantic refused (``ValidationError.errors()`` or a
    ``RequestValidationError``'s), as the routes answer it; batch lines
    (``api/batches/lines.py``) are refused with the same words."""
    # Of a union's failed branches (content: str | list[TextPart]) the deepest
    # names the problem: 'messages.0.content.0.type' rather than "not a string".
    first = max(problems, key=lambda e: len(e.get("loc", ())))
    param = _param_from_loc(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "json_invalid":
        msg = f"We could not parse the JSON body of your request: {msg}"
        param = None
    elif param:
        msg = f"Invalid value for '{param}': {msg}"
    return APIError(400, msg, param=param)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error(exc.errors())
    log.info("400 %s %s: %s", request.method, request.url.path, err.message)
    _count(request, 400, "invalid_request")
    return err.response()


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    log.log(level, "%d %s %s code=%s: %s", exc.status, request.method, request.url.path, exc.code, exc.message)
    _count(request, exc.status, exc.code)
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, _body_problem(exc.__cause__) or str(exc.detail), type=kind).response()


def _body_problem(cause: BaseException | None) -> str | None:
    # FastAPI answers every body it cannot decode with "There was an error
    # parsing the body", keeping the reason as the cause: name it.
    if isinstance(cause, UnicodeDecodeError):
        return f"The request body is not valid UTF-8 ({cause.reason} at byte {cause.start}); send JSON as UTF-8."
    if isinstance(cause, RecursionError):
        return "The JSON body is nested too deeply to parse."
    return None


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("500 %s %s: unexpected %s", request.method, request.url.path, type(exc).__name__)
    _count(request, 500, "internal")
    return APIError(500, "The server had an internal error; the log has the details.", type="server_error").response()


async def _broker_down(request: Request, exc: Exception) -> JSONResponse:
    # Redis (the registry and the queues) is unreachable: nothing can be served now.
    log.warning("503 %s %s: Redis unreachable: %s", request.method, request.url.path, exc)
    _count(request, 503, "broker_unavailable")
    return APIError(503, "The job queue (Redis) is unreachable; retry shortly.", type="service_unavailable_error",
                    code="broker_unavailable", headers={"Retry-After": "1"}).response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    for broker_error in (RedisConnectionError, RedisTimeoutError, KombuOperationalError):
        app.add_exception_handler(broker_error, _broker_down)
    app.add_exception_handler(Exception, _unexpected)
