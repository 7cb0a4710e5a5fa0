"""API keys: ``Authorization: Bearer <key>`` on every /v1 route when keys
are configured (``--api-key`` / ``LLMQ_API_KEYS``). Keys are compared in
constant time, each one, so timing tells nothing about which part matched."""

from __future__ import annotations

import hmac

from fastapi import Request

from api.errors import APIError
from broker.settings import Settings


def _matches(given: str, keys: list[str]) -> bool:
    found = False
    for key in keys:  # no early exit: every key costs the same
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


async def require_api_key(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")
    if not _matches(token.strip(), settings.api_keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
