"""LoRA adapters loaded and unloaded while the fleet runs, with vLLM's
routes and bodies (``POST /v1/load_lora_adapter``,
``/v1/unload_lora_adapter``), behind the admin key: ``LLMQ_ADMIN_KEY``, sent
as ``Authorization: Bearer <admin key>``. Unset, the routes refuse every
call (403): loading code paths into a worker is never open by default.

A load is checked before anything is listed: an ``adapter`` job goes to the
base model's queue, and the worker that takes it reads the adapter and
checks it against the base as it would serve it (a refusal is a 400 with the
reason). Then the adapter goes in the ``adapters`` hash (``broker/keys.py``),
which every worker of the base reads at its next heartbeat and serves
(``worker/adapters.py``); the route answers once a heartbeat lists it, and a
request sent before that waits in the adapter's queue, not in a 404."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import InteractiveDep, RegistryDep
from api.errors import ERROR_RESPONSES, APIError, model_not_found
from api.jobs.interactive import new_job_id
from broker.keys import Keys
from broker.registry import LiveModel, Registry
from broker.schemas import AdapterEntry, Job

log = logging.getLogger("llmq.api.admin")

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"  # as worker/lora.py takes it: it becomes a queue's name


async def require_admin_key(request: Request) -> None:
    admin = request.app.state.settings.admin_key
    if admin is None:
        raise APIError(403, "Loading LoRA adapters through the API is off. Set LLMQ_ADMIN_KEY on the API and send "
                            "it as 'Authorization: Bearer <admin key>'.", type="permission_error", code="admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             admin.get_secret_value().encode()):
        raise APIError(401, "This route needs the admin key (LLMQ_ADMIN_KEY) as 'Authorization: Bearer <key>'.",
                       type="authentication_error", code="invalid_admin_key")


router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin_key)], responses=ERROR_RESPONSES)


class LoadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: Annotated[str, Field(pattern=NAME)]
    lora_path: Annotated[str, Field(min_length=1, description="the adapter directory, as the workers see it")]
    base_model: str | None = Field(default=None, description="llmq: the base it is for; needed only when the "
                                                              "fleet serves more than one chat model")


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str


async def _base_for(registry: Registry, asked: str | None) -> str:
    live = await registry.live_models()
    if asked is not None:
        info = live.get(asked)
        if info is None:
            raise model_not_found(asked)
        if info.info.kind != "chat" or info.info.parent is not None:
            raise APIError(400, f"'{asked}' is not a base chat model: an adapter's base serves chat.",
                           code="invalid_value", param="base_model")
        return asked
    bases = sorted(name for name, m in live.items() if m.info.kind == "chat" and m.info.parent is None)
    if len(bases) != 1:
        raise APIError(400, f"Name the adapter's base in 'base_model': the live chat models are {bases or 'none'}.",
                       code="missing_required_parameter", param="base_model")
    return bases[0]


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request, interactive: InteractiveDep,
                            registry: RegistryDep) -> str:
    r, keys = request.app.state.redis, Keys(request.app.state.settings.key_prefix)
    name = body.lora_name
    if name in await registry.live_models() or await r.hexists(keys.adapters(), name):
        raise APIError(400, f"The model '{name}' is served already; unload it first to load another adapter under "
                            "that name.", code="adapter_exists", param="lora_name")
    base = await _base_for(registry, body.base_model)
    entry = AdapterEntry(name=name, base=base, path=body.lora_path, added_at=time.time())
    checked = await interactive.check_adapter(Job(job_id=new_job_id("lora"), model=base, kind="adapter",
                                                  adapter=entry, reply_channel="", submitted_at=time.time()))
    await r.hset(keys.adapters(), name, entry.model_dump_json())
    log.info("LoRA adapter %s of %s loaded from %s (rank %d, %d layers)", name, base, body.lora_path, checked.rank,
             checked.modules)
    await _until(registry, lambda live: name in live, request.app.state.settings.heartbeat_interval_s * 3)
    return f"Success: LoRA adapter '{name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request, registry: RegistryDep) -> str:
    r, keys = request.app.state.redis, Keys(request.app.state.settings.key_prefix)
    name = body.lora_name
    if not await r.hdel(keys.adapters(), name):
        info = (await registry.live_models()).get(name)
        if info is not None and info.info.parent is not None:
            raise APIError(400, f"The adapter '{name}' is served from its workers' --lora or --lora-dir, not loaded "
                                "through the API: restart them without it, or take it out of the directory.",
                           code="invalid_value", param="lora_name")
        raise APIError(404, f"No LoRA adapter '{name}' was loaded through the API.", code="model_not_found",
                       param="lora_name")
    log.info("LoRA adapter %s unloaded", name)
    await _until(registry, lambda live: name not in live, request.app.state.settings.heartbeat_interval_s * 3)
    return f"Success: LoRA adapter '{name}' removed successfully."


async def _until(registry: Registry, done: Callable[[dict[str, LiveModel]], bool], within_s: float) -> None:
    """Until the registry shows the change (each worker's next heartbeat), at most ``within_s``."""
    deadline = time.monotonic() + within_s
    while not done(await registry.live_models()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
