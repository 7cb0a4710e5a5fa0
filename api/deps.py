"""Dependency aliases: routes declare what they need, ``app.state`` holds it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.jobs.interactive import Interactive
from broker.registry import Registry


def _interactive(request: Request) -> Interactive:
    return request.app.state.interactive  # type: ignore[no-any-return]


def _registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


InteractiveDep = Annotated[Interactive, Depends(_interactive)]
RegistryDep = Annotated[Registry, Depends(_registry)]
