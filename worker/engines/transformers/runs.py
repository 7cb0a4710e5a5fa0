"""The transformers engine's runs (one choice each, with its place in the
KV cache and its text state) and the layout of one step's runs as the flat
sequence the model's forward takes (``worker/engines/transformers/attention.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

from broker.schemas import FinishReason, TokenLogprob
from worker.engines.protocol import Choice, Update
from worker.engines.transformers.attention import Chunk, StepLayout
from worker.engines.transformers.detok import IncrementalDetokenizer
from worker.engines.transformers.kvcache import KVCache
from worker.engines.transformers.sampler import Slot
from worker.engines.transformers.stops import StopStrings


@dataclass(eq=False, kw_only=True)
class Run(Choice):
    """One choice of one job inside this engine."""

    detok: IncrementalDetokenizer
    stops: StopStrings = field(init=False)
    slot: Slot | None = None
    grammar: Any = None  # the job's compiled xgrammar grammar, if its output is constrained
    adapter: str | None = None  # the LoRA adapter the job names (lora.py); None: the base model
    # Its prefix-cache chain's start: None for the base; per adapter *as loaded*,
    # so an adapter unloaded and loaded again under its name shares no KV blocks.
    cache_salt: int | None = None
    lora_slot: int = 0  # the bank slot holding its weights while it runs (engine thread)
    # engine-thread state
    ids: list[int] = field(init=False)  # prompt, then generated tokens
    computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    dropped: bool = False  # cancelled or stopped: the engine lets it go at the next step

    def __post_init__(self) -> None:
        self.stops = StopStrings(self.job.stop)
        self.ids = list(self.prompt_ids)

    @property
    def generated(self) -> int:
        return len(self.ids) - len(self.prompt_ids)


@dataclass(frozen=True)
class StepOutput:
    run: Run
    token: int | None
    finish: FinishReason | None = None
    error: str | None = None


Plan = list[tuple[Run, int]]  # one step's runs and how many tokens each computes; decoders first


def layout(plan: Plan, cache: KVCache, device: torch.device | str
           ) -> tuple[StepLayout, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """One step's flat sequence for the forward: its attention layout, input
    ids, positions, the indices of the tokens whose logits are sampled, and
    each token's LoRA slot (0: the base)."""
    decode = [r for r, n in plan if n == 1]
    ids: list[int] = []
    positions: list[int] = []
    write: list[int] = []
    logit_at: list[int] = []
    chunks: list[Chunk] = []
    slots: list[int] = []
    for run, n in plan:  # decoders come first in the plan
        start, stop = run.computed, run.computed + n
        if n > 1 and start == 0:
            chunks.append(Chunk(start=len(ids), length=n))
        elif n > 1:
            read, _ = cache.read_index([run.blocks], [stop])
            causal = torch.arange(stop).unsqueeze(0) <= torch.arange(start, stop).unsqueeze(1)
            chunks.append(Chunk(start=len(ids), length=n, read=read[0].to(device),
                                mask=causal[None, None].to(device)))
        ids += run.ids[start:stop]
        slots += [run.lora_slot] * n
        positions += range(start, stop)
        write += cache.rows(run.blocks, start, stop)
        if stop == len(run.ids):
            logit_at.append(len(ids) - 1)
    decode_read = decode_mask = None
    if decode:
        read, mask = cache.read_index([r.blocks for r in decode], [r.computed + 1 for r in decode])
        decode_read, decode_mask = read.to(device), mask[:, None, None, :].to(device)
    layout = StepLayout(cache=cache, write=torch.tensor(write, device=device), decode=len(decode),
                        decode_read=decode_read, decode_mask=decode_mask, chunks=tuple(chunks))
    return (layout, torch.tensor([ids], device=device), torch.tensor([positions], device=device),
            torch.tensor(logit_at, device=device, dtype=torch.long), slots)


def updates_of(outputs: list[StepOutput], decode: Callable[[list[int]], str]) -> tuple[list[Update], bool]:
    """Steps' outputs as one Update per run: tokens to text (stop strings
    applied, logprobs attached). Also whether a run just met a stop string
    (it is marked dropped: the engine lets it go at its next step)."""
    per_run: dict[Run, list[StepOutput]] = {}
    for o in outputs:  # several steps may have piled up
        per_run.setdefault(o.run, []).append(o)
    updates: list[Update] = []
    dropped = False
    for run, outs in per_run.items():
        if run.finish_reason is not None:  # cancelled or stopped; a step may still have been in flight
            continue
        error = next((o.error for o in outs if o.error), None)
        if error is not None:
            updates.append(Update(run, error=error))
            continue
        fresh = [o.token for o in outs if o.token is not None]
        finish = next((o.finish for o in outs if o.finish), None)
        text, stopped = run.stops.feed(run.detok.push(fresh))
        if finish and not stopped:
            more, stopped = run.stops.feed(run.detok.flush())
            text += more if stopped else more + run.stops.flush()
        picks = run.slot.take(len(fresh)) if run.slot is not None and run.slot.wants_logprobs else []
        if stopped and not finish:
            run.dropped = dropped = True  # the rest would never be sent
        logprobs = [TokenLogprob(token=decode([p.token]), logprob=p.logprob, top=[(decode([t]), lp) for t, lp in p.top])
                    for p in picks] or None
        updates.append(Update(run, text=text, tokens=len(fresh), logprobs=logprobs,
                              finish="stop" if stopped else finish))
    return updates, dropped
