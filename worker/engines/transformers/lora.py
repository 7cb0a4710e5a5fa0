"""Many LoRA adapters in one batch: each row of a step gets its own
adapter's deltas (or none), as LoRAX and vLLM's punica kernels do.

Every linear layer an adapter trains is wrapped once (``LoraLinear``); the
wrappers share one ``LoraBank``, which holds ``--max-loras`` slots of
adapter weights stacked per layer (``A: [slots + 1, R, in]``,
``B: [slots + 1, out, R]``, slot 0 all zeros for base rows, ``R`` =
``--max-lora-rank``, smaller ranks zero-padded, the scale folded into B).
The engine arms the bank for one step with the slot of each of its tokens;
each wrapper adds, per adapter present in the step, ``(x[rows] @ A.T) @ B.T``
to the base layer's output for that adapter's rows: an exact product per
adapter, whatever else shares the step, so a row's answer is that adapter's
alone. A step with no adapter row costs nothing more than the base.

A layer is wrapped when the first adapter that trains it is loaded into a
slot, so a model serving no adapter runs its plain layers. Slots are taken
by runs (``acquire``) and given back when a run ends (``release``); an
adapter not resident takes a free slot or the least recently used one no run
holds. A run whose adapter finds every slot held waits in the engine's
queue.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.loading import ModelSpec
from worker.lora import Adapter, AdapterError, read


@dataclass(frozen=True)
class LoraStep:
    """One step's adapter rows: (slot, indices of its tokens) per adapter present."""

    segments: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def of(cls, token_slots: list[int], device: torch.device | str) -> LoraStep | None:
        if not any(token_slots):
            return None
        slots = torch.tensor(token_slots)
        return cls(tuple((int(s), (slots == s).nonzero(as_tuple=True)[0].to(device))
                         for s in sorted(set(token_slots) - {0})))


class LoraLinear(nn.Module):
    """A base linear layer plus the deltas of the step's adapters."""

    def __init__(self, base: nn.Module, bank: LoraBank, slots: int, rank: int) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        weight = base.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float16  # bitsandbytes: int8 / 4-bit
        self.register_buffer("A", torch.zeros(slots + 1, rank, base.in_features, dtype=dtype, device=weight.device))
        self.register_buffer("B", torch.zeros(slots + 1, base.out_features, rank, dtype=dtype, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        step = self.bank.step
        if step is None:
            return y
        flat, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for slot, rows in step.segments:
            part = flat.index_select(0, rows).to(self.A.dtype)
            out.index_add_(0, rows, ((part @ self.A[slot].T) @ self.B[slot].T).to(out.dtype))
        return y


class LoraBank:
    """The slots of one model's adapters, and the step they apply to.

    Adapters come and go while the worker runs (``add``/``remove``, from the
    heartbeat's thread); slots are taken, loaded and given back on the
    engine's thread only, which is also the only one that wraps a layer, so
    no forward ever sees a layer change under it."""

    def __init__(self, model: nn.Module, base: ModelSpec, max_loras: int, max_rank: int) -> None:
        self.model = model
        self.base = base
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.adapters: dict[str, Adapter] = {}  # served adapter name -> its files (worker/lora.py)
        self.step: LoraStep | None = None
        self._layers: dict[str, LoraLinear] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, least recently used first
        self._holders = [0] * (max_loras + 1)  # runs holding each slot
        self.loads_of: dict[str, int] = {}  # per adapter, for the heartbeat
        # _slot_of changes on the engine's thread (acquire) and the heart's
        # (remove), and is read by the heart and Celery's consumer (resident).
        self._lock = threading.Lock()

    def read(self, name: str, path: str | Path) -> Adapter:
        """An adapter's config, checked against this base; raises AdapterError."""
        if name in self.base.served_names():
            raise AdapterError(f"LoRA adapter {name!r}: the name is this worker's base model")
        return read(name, path, self.base, self.max_rank)

    def serve(self, name: str, path: str | Path) -> Adapter:
        """Serve ``name`` from now on; its tensors are read on its first job."""
        if name in self.adapters:
            raise AdapterError(f"LoRA adapter {name!r} is served already (from {self.adapters[name].path})")
        adapter = self.read(name, path)
        self.add(adapter)
        return adapter

    def add(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter
        self.loads_of.setdefault(adapter.name, 0)

    def remove(self, name: str) -> None:
        """No new run gets ``name``; runs holding its slot finish with it."""
        self.adapters.pop(name, None)
        self.loads_of.pop(name, None)
        with self._lock:
            self._slot_of.pop(name, None)

    def check(self, adapter: Adapter) -> None:
        """Read ``adapter``'s tensors and check each against the layer it
        trains; raises AdapterError with the reason. Reads the model only."""
        for path, (a, b) in adapter.weights.items():
            base = self._base_layer(adapter, path)
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise AdapterError(f"LoRA adapter {adapter.name!r}: {path} is {b.shape[0]}x{a.shape[1]} in the "
                                   f"adapter, {base.out_features}x{base.in_features} in this base model: it was "
                                   "trained on another model")

    def _base_layer(self, adapter: Adapter, path: str) -> nn.Module:
        try:
            layer = self.model.get_submodule(path)
        except AttributeError:
            layer = None
        if isinstance(layer, LoraLinear):
            return layer.base
        if layer is None or not hasattr(layer, "in_features"):
            raise AdapterError(f"LoRA adapter {adapter.name!r} trains {path!r}, which this base model has no "
                               "linear layer for: it was trained on another model")
        return layer

    @property
    def loads(self) -> int:
        return sum(self.loads_of.values())

    def resident(self) -> list[str]:
        """The adapters in a slot now, least recently used first (any thread)."""
        with self._lock:
            return list(self._slot_of)

    def acquire(self, name: str) -> int | None:
        """A slot holding ``name``'s weights, held for one run; None if every
        slot is held by running rows of other adapters. Engine thread; raises
        AdapterError if the adapter's files turn out bad on its first load."""
        with self._lock:
            slot = self._slot_of.get(name)
            if slot is not None:
                self._slot_of.move_to_end(name)
                self._holders[slot] += 1
                return slot
            slot = self._free_slot()
        adapter = self.adapters.get(name)
        if slot is None or adapter is None:  # None: removed this instant; the engine fails its run
            return None
        self._load(adapter, slot)
        self._holders[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._holders[slot] -= 1

    def _free_slot(self) -> int | None:
        used = set(self._slot_of.values())
        for slot in range(1, self.max_loras + 1):
            if slot not in used and self._holders[slot] == 0:  # held: a removed adapter's runs still use it
                return slot
        for name, slot in self._slot_of.items():  # least recently used first
            if self._holders[slot] == 0:
                del self._slot_of[name]
                return slot
        return None

    def _load(self, adapter: Adapter, slot: int) -> None:
        self.check(adapter)
        for path in adapter.weights:
            if path not in self._layers:  # the first adapter to train this layer: wrap it
                parent, _, attr = path.rpartition(".")
                layer = LoraLinear(self._base_layer(adapter, path), self, self.max_loras, self.max_rank)
                setattr(self.model.get_submodule(parent), attr, layer)
                self._layers[path] = layer
        with torch.no_grad():
            for path, layer in self._layers.items():
                layer.A[slot].zero_()
                layer.B[slot].zero_()
                pair = adapter.weights.get(path)
                if pair is not None:
                    a, b = pair
                    layer.A[slot, : a.shape[0]].copy_(a)
                    layer.B[slot, :, : b.shape[1]].copy_(b * adapter.scale)
        with self._lock:
            self._slot_of[adapter.name] = slot
        self.loads_of[adapter.name] = self.loads_of.get(adapter.name, 0) + 1

    def arm(self, token_slots: list[int], device: torch.device | str) -> None:
        self.step = LoraStep.of(token_slots, device)

    def disarm(self) -> None:
        self.step = None
