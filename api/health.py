"""Operations routes: /health says the process answers; /ready says it can
serve (Redis reachable and at least one live worker); /metrics is for
Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    try:
        await state.redis.ping()
        workers = await state.registry.workers()
    except (RedisError, OSError) as exc:
        return JSONResponse({"status": "unavailable", "reason": f"redis unreachable: {exc}"}, status_code=503)
    if not workers:
        return JSONResponse({"status": "unavailable", "reason": "no live worker"}, status_code=503)
    models = sorted({m.name for w in workers for m in w.models})
    return JSONResponse({"status": "ready", "workers": len(workers), "models": models})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    body = await state.metrics.render(state.registry, state.redis, [m.name for m in state.settings.models])
    return Response(body, media_type=CONTENT_TYPE_LATEST)
