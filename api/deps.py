"""Dependency aliases: routes declare what they need, ``app.state`` holds it.

Every dependency that only reads state is ``async def``: FastAPI runs a plain
``def`` dependency in a thread pool, a thread hop per request for an
attribute lookup (other modules' ``_store`` and friends follow this too)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.jobs.interactive import Interactive
from broker.registry import Registry


async def _interactive(request: Request) -> Interactive:
    return request.app.state.interactive  # type: ignore[no-any-return]


async def _registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


InteractiveDep = Annotated[Interactive, Depends(_interactive)]
RegistryDep = Annotated[Registry, Depends(_registry)]
