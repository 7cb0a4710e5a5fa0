"""Which LoRA adapters a worker serves while it runs, beyond the ``--lora``
ones it started with: those in its ``--lora-dir`` (a directory per adapter,
found as it appears) and those loaded through the API (``POST
/v1/load_lora_adapter``: the ``adapters`` hash in Redis, ``broker/keys.py``).

``sync`` runs before each heartbeat, on the heart's thread: it serves what
appeared (config read and checked, tensors on first use), stops serving what
was unloaded or left the directory, and the heartbeat that follows announces
the change. The worker's Celery consumer then takes from the new queues and
leaves the old ones (``worker/intake.py``). An adapter that cannot be
served is logged once with the reason, not retried every beat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import redis

from broker.keys import Keys
from broker.schemas import AdapterEntry
from worker.lora import Adapter, AdapterError, scan

log = logging.getLogger("llmq.worker.adapters")


class AdapterBank(Protocol):
    """What serves an engine's adapters while it runs (the transformers
    engine's ``LoraBank``)."""

    adapters: dict[str, Adapter]

    def read(self, name: str, path: str | Path) -> Adapter: ...
    def check(self, adapter: Adapter) -> None: ...
    def serve(self, name: str, path: str | Path) -> Adapter: ...
    def remove(self, name: str) -> None: ...


class AdapterHost(Protocol):
    """An engine whose adapters come and go while it runs."""

    names: list[str]
    adapters: dict[str, Adapter]
    loras: AdapterBank


def hosts(engines: list[Any]) -> list[AdapterHost]:
    return [e for e in engines if hasattr(getattr(e, "loras", None), "serve")]


class AdapterSync:
    def __init__(self, r: redis.Redis, keys: Keys, engines: list[AdapterHost], lora_dir: str | None,
                 on_change: Callable[[str, AdapterHost | None], None]) -> None:
        self._redis = r
        self._keys = keys
        self._engines = engines
        self._dir = lora_dir
        self._on_change = on_change  # (name, its engine or None when no longer served)
        self._added: dict[str, tuple[AdapterHost, str]] = {}  # name -> (engine, path) added here
        self._refused: set[tuple[str, str]] = set()  # (name, path) logged once

    def sync(self) -> None:
        if not self._engines:
            return
        wanted = self._wanted()
        for name, (engine, path) in list(self._added.items()):
            if wanted.get(name) != (engine, path):
                engine.loras.remove(name)
                del self._added[name]
                self._on_change(name, None)
                self._forget(name)
                log.info("LoRA adapter %s (%s) is no longer served here", name, path)
        for name, (engine, path) in wanted.items():
            if name in self._added or (name, path) in self._refused:
                continue
            try:
                if any(name in e.names or name in e.adapters for e in self._engines):
                    raise AdapterError(f"LoRA adapter {name!r}: the name is served here already")
                engine.loras.serve(name, path)
            except AdapterError as exc:
                self._refused.add((name, path))
                log.error("LoRA adapter %s (%s) not served: %s", name, path, exc)
                continue
            self._added[name] = (engine, path)
            self._on_change(name, engine)
            log.info("LoRA adapter %s of %s served from %s", name, engine.names[0], path)

    def _forget(self, name: str) -> None:
        """Out of the hash of models ever served, so the API answers 404 for
        it (unknown model), not 503 (no live worker); a worker that still
        serves it puts it back at its next heartbeat."""
        try:
            self._redis.hdel(self._keys.models_seen(), name)
        except redis.RedisError as exc:
            log.warning("could not forget LoRA adapter %s: %s", name, exc)

    def _wanted(self) -> dict[str, tuple[AdapterHost, str]]:
        wanted: dict[str, tuple[AdapterHost, str]] = {}
        if self._dir is not None:  # bootstep allows --lora-dir with one base only
            for name, path in scan(self._dir).items():
                wanted[name] = (self._engines[0], str(path))
        try:
            raw = self._redis.hgetall(self._keys.adapters())
        except redis.RedisError as exc:  # keep serving what we serve; the next beat tries again
            log.warning("could not read the loaded LoRA adapters: %s", exc)
            return {**self._added, **wanted}
        for value in raw.values():
            entry = AdapterEntry.model_validate_json(value)
            engine = next((e for e in self._engines if entry.base in e.names), None)
            if engine is not None:
                wanted[entry.name] = (engine, entry.path)
        return wanted


def adapters_of(engine: Any) -> list[str]:
    """The LoRA adapters an engine serves as model names (only the transformers engine has any)."""
    return list(getattr(engine, "adapters", {}))


def resident_adapters(engine: Any) -> list[str]:
    bank = getattr(engine, "loras", None)
    return bank.resident() if bank is not None else []


def adapter_figures(engine: Any, name: str) -> dict[str, Any]:
    """What a heartbeat says of a served name that is a LoRA adapter: its base, whether it is resident, its loads."""
    if name in engine.names:
        return {}
    bank = getattr(engine, "loras", None)
    return {"parent": engine.names[0], "resident": bank is not None and name in bank.resident(),
            "loads": bank.loads_of.get(name, 0) if bank is not None else 0}

