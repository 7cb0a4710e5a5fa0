"""Dependency aliases: routes declare what they need, ``app.state`` holds it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.jobs.lifecycle import Jobs
from broker.registry import Registry


def _jobs(request: Request) -> Jobs:
    return request.app.state.jobs  # type: ignore[no-any-return]


def _registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


JobsDep = Annotated[Jobs, Depends(_jobs)]
RegistryDep = Annotated[Registry, Depends(_registry)]
