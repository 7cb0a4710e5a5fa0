"""API keys: ``Authorization: Bearer <key>`` on every /v1 route when keys
are configured (``--api-key`` / ``LLMQ_API_KEYS``, named keys with limits in
``LLMQ_API_KEYS_FILE``: ``api/keys.py``). Keys are compared in constant
time, each one, so timing tells nothing about which part matched. The
matched key's name goes on ``request.state`` for the log line and metrics;
a key with limits is counted against them here."""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError
from api.keys import NamedKey

RATELIMIT_HEADERS = "ratelimit_headers"  # request.state: the x-ratelimit-* headers of this answer


def _match(given: str, keys: list[NamedKey]) -> NamedKey | None:
    found = None
    for key in keys:  # no early exit: every key costs the same
        if hmac.compare_digest(given.encode(), key.key.encode()):
            found = key
    return found


async def require_api_key(request: Request) -> None:
    state = request.app.state
    keys: list[NamedKey] = state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")
    key = _match(token.strip(), keys)
    if key is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    request.state.api_key = key
    if key.limited:
        try:
            setattr(request.state, RATELIMIT_HEADERS, await state.rate_limiter.admit(key))
        except APIError:  # the 429 carries the headers itself
            state.metrics.observe_key(key.name, "rate_limited")
            raise
    state.metrics.observe_key(key.name, "admitted")


class RateLimitHeaders:
    """Puts the x-ratelimit-* headers ``require_api_key`` computed on the
    answer, whatever the route answers (a body, a stream, an error): a pure
    ASGI middleware, so streams pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = scope.get("state", {}).get(RATELIMIT_HEADERS)
                if extra:
                    message["headers"] = [*message.get("headers", []),
                                          *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())]
            await send(message)

        await self.app(scope, receive, send_with_headers)
