"""The engines a worker can run, by name.

An engine declares itself with one ``EngineKind``: its name, the worker
options only it reads (click options, added to ``celery worker``'s by
``worker/bootstep.py``), the class of its options (``EngineOptions`` or a
subclass that adds those fields) and its engine class, named as
``"module:Class"`` and imported only when a model is built with it. So
listing the engines and their options (the worker's ``--help``,
``llmq worker --engine``) imports no engine library: a module that declares
an engine must not import torch, vLLM or the like at its top.

Every engine class is built the same way: ``Cls(spec, options, publisher)``
(``worker/engines/protocol.py``, ``EngineClass``).

Where the registry finds engines, the first time it is asked:

- llmq's own: every module (or package) of ``worker/engines/`` that
  names a declaration ``ENGINE``; a new one is found as it is added;
- every installed distribution's entry point in the group ``llmq.engines``,
  whose object is an ``EngineKind``::

      [project.entry-points."llmq.engines"]
      echo = "my_package.echo:ENGINE"

  A plug-in is found by the ``llmq worker`` command and by the worker
  process alike, before options are parsed, so its own options work as
  llmq's do. One that cannot be loaded is logged and left out.
  ``tests/test_engine_plugin.py`` defines one, an echo engine, and serves
  chat requests through a worker that finds it this way.

Adding an engine is one module with one declaration (and, outside llmq, its
entry point); nothing else names it.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal, Self

import click

if TYPE_CHECKING:
    from broker.settings import Settings
    from worker.engines.protocol import EngineClass

log = logging.getLogger("llmq.worker.engines")

GROUP = "llmq.engines"
DEFAULT = "transformers"
# worker/toolcalls.py's formats, named here so that reading options imports no engine.
TOOL_FORMATS = ("hermes", "llama3_json", "mistral", "generic")
MAX_LORAS = 4
MAX_LORA_RANK = 16


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """What every engine takes from the worker's options. An engine with
    options of its own subclasses it and reads them in ``read``."""

    engine: str = DEFAULT
    max_batch_size: int = 16
    kv_cache_tokens: int | None = None
    prefix_caching: bool = True  # the transformers and vLLM engines; llama-server always caches prompts
    tool_call_parser: str | None = None  # one of TOOL_FORMATS; None: from the chat template
    stream_interval: int = 1  # tokens per published Delta after a choice's first (worker/engines/emitter.py)
    # LoRA adapters (worker/lora.py), for the engines that serve them (transformers, vLLM):
    loras: tuple[tuple[str, str], ...] = ()  # --lora NAME=PATH: adapters served as model names
    lora_dir: str | None = None  # --lora-dir: each adapter directory in it, by its name (worker/adapters.py)
    max_loras: int = MAX_LORAS  # adapters resident at once
    max_lora_rank: int = MAX_LORA_RANK

    @classmethod
    def read(cls, opts: Mapping[str, Any]) -> Self:
        """From the worker's parsed options (click's names, ``max_batch_size``)."""
        return cls(**cls.common(opts))

    @staticmethod
    def common(opts: Mapping[str, Any]) -> dict[str, Any]:
        from worker.lora import parse_option

        return {"engine": opts.get("engine") or DEFAULT, "max_batch_size": opts.get("max_batch_size") or 16,
                "kv_cache_tokens": opts.get("kv_cache_tokens"), "prefix_caching": opts.get("prefix_caching", True),
                "tool_call_parser": opts.get("tool_call_parser"), "stream_interval": opts.get("stream_interval") or 1,
                "loras": tuple(parse_option(v) for v in opts.get("lora") or ()), "lora_dir": opts.get("lora_dir"),
                "max_loras": opts.get("max_loras") or MAX_LORAS,
                "max_lora_rank": opts.get("max_lora_rank") or MAX_LORA_RANK}


@dataclass(frozen=True, kw_only=True)
class EngineKind:
    """One engine's declaration."""

    name: str  # what --engine takes
    engine: str  # "module:Class" of its EngineClass, imported when a model is built
    summary: str = ""  # a few words for --engine's help
    options_type: type[EngineOptions] = EngineOptions
    options: Sequence[click.Option] = ()  # the worker options only this engine reads
    # Run once in the worker's main thread before anything is loaded; returns
    # the options to build with (the transformers engine keeps torch's CPU
    # threads for its engine threads there).
    before_load: Callable[[Any], Any] | None = None
    # The Python that `llmq worker` runs a worker of this engine with (vLLM:
    # its own virtualenv); None: the one running `llmq`.
    python: Callable[[Settings], str] | None = None
    # False: the engine needs no model files (the synthetic engine), so a
    # model may be only a --model-name; its --model-path, if any, is optional.
    weights: bool = True
    # LoRA adapters it serves: "runtime" (--lora, and --lora-dir and the
    # API's loads while it runs), "start" (--lora only), None (refused).
    loras: Literal["runtime", "start"] | None = None

    def lora_problem(self, opts: Mapping[str, Any]) -> str | None:
        """Why this engine cannot take the worker's LoRA options, or None."""
        if opts.get("lora_dir") and self.loras != "runtime":
            return f"--lora-dir is served by engines that load adapters while they run; {self.name} does not"
        if opts.get("lora") and self.loras is None:
            return f"the {self.name} engine does not serve LoRA adapters (--lora)"
        return None

    def models_problem(self, paths: Sequence[str], names: Sequence[str]) -> str | None:
        """Why these --model-path and --model-name options serve no model as
        this engine needs them, or None. The i-th name names the i-th path;
        an engine without ``weights`` also takes names past the paths."""
        if not paths and (self.weights or not names):
            return "no --model-path given: a worker must serve at least one model" + (
                "" if self.weights else " (this engine also takes --model-name alone)")
        if self.weights and len(names) > len(paths):
            return f"{len(names)} --model-name options for {len(paths)} --model-path options"
        return None

    def engine_class(self) -> EngineClass:
        module, _, attr = self.engine.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


_kinds: dict[str, EngineKind] = {}
_loaded = False


def register(kind: EngineKind) -> None:
    """Add an engine. Its options may not take another engine's names."""
    if kind.name in _kinds and _kinds[kind.name] is not kind:
        raise ValueError(f"two engines are named {kind.name!r}")
    taken = {o.name for k in _kinds.values() if k is not kind for o in k.options}
    clash = sorted(o.name for o in kind.options if o.name in taken)
    if clash:
        raise ValueError(f"engine {kind.name!r}: options {clash} are another engine's")
    _kinds[kind.name] = kind


def kinds() -> dict[str, EngineKind]:
    """Every engine: the default, llmq's others, then plug-ins."""
    _load()
    return dict(_kinds)


def kind_of(name: str) -> EngineKind:
    """Raises ``KeyError`` with the names there are."""
    known = kinds()
    if name not in known:
        raise KeyError(f"no engine {name!r}; there are {', '.join(known)}")
    return known[name]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for kind in _builtin():
        register(kind)
    for ep in entry_points(group=GROUP):
        try:
            kind = ep.load()
            if not isinstance(kind, EngineKind):
                raise TypeError(f"{ep.value} is a {type(kind).__name__}, not an EngineKind")
            register(kind)
        except Exception as exc:  # one broken plug-in must not stop workers of the other engines
            log.warning("engine plug-in %s (%s) left out: %s", ep.name, ep.value, exc)


def _builtin() -> list[EngineKind]:
    """llmq's own engines, the default first."""
    import worker.engines as package

    found = []
    for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        kind = getattr(importlib.import_module(module.name), "ENGINE", None)
        if isinstance(kind, EngineKind):
            found.append(kind)
    return sorted(found, key=lambda k: (k.name != DEFAULT, k.name))
