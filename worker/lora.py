"""LoRA adapters in PEFT's format, read without PEFT: the worker option
``--lora NAME=PATH``, what an adapter directory holds, and why one is
refused. The engine that serves adapters applies them
(``worker/engines/transformers/lora.py``).

An adapter directory holds ``adapter_config.json`` (``peft_type`` LORA,
``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path``...)
and ``adapter_model.safetensors``, whose tensors are named
``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``). The delta of a module is
``scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``). Variants llmq does not apply (DoRA, trained biases, extra
trained modules) are refused, never half-applied.

An adapter's config is read when it is named (``read``: at the worker's
start for ``--lora``, when it is found for ``--lora-dir`` or loaded through
the API); its tensors when a slot first takes it (``Adapter.weights``), so a
directory of many adapters costs memory only for those in use.
"""

from __future__ import annotations

import json
import math
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from worker.loading import ModelLoadError, ModelSpec

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SERIALS = itertools.count(1)
# What a served model name may be (it becomes a queue's name): a directory of
# --lora-dir under another name is not served, and says so in the log.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class AdapterError(ModelLoadError):
    """An adapter that cannot be served on this base, and why."""


@dataclass(frozen=True, eq=False)
class Adapter:
    name: str
    path: Path
    rank: int
    scale: float
    base: str | None  # base_model_name_or_path, as trained
    # One per adapter read, never reused: what the engine's prefix cache keys
    # an adapter's KV blocks by, so one loaded again under a name shares none.
    serial: int = field(default_factory=lambda: next(_SERIALS))

    @cached_property
    def weights(self) -> dict[str, tuple[Any, Any]]:
        """Module path (as the base model names it) -> (A ``[r, in]``, B
        ``[out, r]``), on the CPU; read from disk the first time it is asked for."""
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.path / WEIGHTS), device="cpu")
        except FileNotFoundError:
            raise AdapterError(f"LoRA adapter {self.name!r} ({self.path}): no {WEIGHTS}") from None
        except Exception as exc:  # a truncated or foreign file: safetensors' own errors vary
            raise AdapterError(f"LoRA adapter {self.name!r} ({self.path}/{WEIGHTS}): {exc}") from None
        return _pairs(self.name, tensors.items())


def parse_option(value: str) -> tuple[str, str]:
    """``--lora NAME=PATH``."""
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ModelLoadError(f"--lora {value!r}: expected NAME=PATH (a PEFT adapter directory)")
    return name.strip(), path.strip()


def _config(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / CONFIG).read_text()))
    except FileNotFoundError:
        raise AdapterError(f"{path}: no {CONFIG} (not a PEFT adapter directory)") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}/{CONFIG}: {exc}") from None


def _refusal(cfg: dict[str, Any]) -> str | None:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        return f"peft_type {cfg.get('peft_type')!r} is not LORA"
    if cfg.get("use_dora"):
        return "DoRA adapters (use_dora) are not supported"
    if cfg.get("bias", "none") != "none":
        return f"trained biases (bias={cfg.get('bias')!r}) are not supported"
    if cfg.get("modules_to_save"):
        return f"adapters that also train whole modules (modules_to_save={cfg['modules_to_save']}) are not supported"
    if cfg.get("fan_in_fan_out"):
        return "fan_in_fan_out adapters (GPT-2's Conv1D layout) are not supported"
    return None


def _same_base(trained_on: str | None, spec: ModelSpec) -> bool:
    """By name: the last part of the path or Hugging Face id it was trained
    on against the base's directory, id and served names. The tensors'
    shapes are checked too, when they are loaded into the model."""
    if not trained_on:
        return True
    wanted = trained_on.rstrip("/").rsplit("/", 1)[-1].lower()
    ours = {spec.path.rstrip("/").rsplit("/", 1)[-1].lower(), *(n.lower() for n in spec.served_names())}
    return wanted in ours


def scan(directory: str | Path) -> dict[str, Path]:
    """``--lora-dir``: each subdirectory holding an adapter config, by its name."""
    root = Path(directory)
    try:
        found = sorted(p for p in root.iterdir() if (p / CONFIG).is_file())
    except OSError:
        return {}
    return {p.name: p for p in found}


def read(name: str, path: str | Path, spec: ModelSpec, max_rank: int) -> Adapter:
    """Read and check an adapter's config for the base ``spec`` (its tensors
    are read on first use); raises AdapterError with the reason."""
    if not NAME.match(name):
        raise AdapterError(f"LoRA adapter name {name!r}: use letters, digits and _ . : - (at most 128)")
    root = Path(path)
    cfg = _config(root)
    refusal = _refusal(cfg)
    if refusal is not None:
        raise AdapterError(f"LoRA adapter {name!r} ({root}): {refusal}")
    rank = int(cfg.get("r") or 0)
    ranks = [rank, *map(int, (cfg.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise AdapterError(f"LoRA adapter {name!r} ({root}) has rank {max(ranks)}, over --max-lora-rank {max_rank}")
    if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise AdapterError(f"LoRA adapter {name!r} ({root}): per-module ranks or alphas are not supported")
    base = cfg.get("base_model_name_or_path")
    if not _same_base(base, spec):
        raise AdapterError(f"LoRA adapter {name!r} ({root}) was trained on {base!r}, not on this worker's base "
                           f"{spec.path!r} ({', '.join(spec.served_names())})")
    alpha = float(cfg.get("lora_alpha") or rank)
    scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    return Adapter(name=name, path=root, rank=rank, scale=scale, base=base)


def _pairs(name: str, tensors: Iterable[tuple[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """PEFT's tensor names to (A, B) per module path of the base model."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    for key, tensor in tensors:
        module, sep, rest = key.removeprefix(PREFIX).rpartition(".lora_")
        if not sep or rest.split(".")[0] not in ("A", "B"):
            raise AdapterError(f"LoRA adapter {name!r}: unexpected tensor {key!r}")
        (a if rest.startswith("A") else b)[module] = tensor
    if set(a) != set(b) or not a:
        raise AdapterError(f"LoRA adapter {name!r}: lora_A and lora_B tensors do not pair up")
    return {m: (a[m], b[m]) for m in sorted(a)}
