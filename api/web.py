"""The web chat page: ``GET /`` serves ``api/static/index.html`` and
``/static`` the script and stylesheet beside it.

Plain files, no build step and nothing from a CDN, so the page works offline.
It calls this API's own /v1 routes from the browser, so an API key, when the
server wants one, is typed into the page; the page itself needs none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Revalidate on every load (cheap: ETag / 304), so an upgraded server never
# runs against a stale script from the browser's cache.
CACHE_CONTROL = "no-cache"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": CACHE_CONTROL})


class _StaticFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = CACHE_CONTROL
        return response


def install(app: FastAPI) -> None:
    """Add the page: the router for ``/`` and a mount for ``/static``."""
    app.include_router(router)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
