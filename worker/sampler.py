"""Per-request sampling on top of transformers' continuous batching.

transformers batches the forward pass and owns the KV cache; its stock
per-request processors know only temperature, top_p and top_k, and its
sampler draws from one shared RNG. llmq needs more per request: greedy at
temperature 0, presence and frequency penalties over the request's own
output, logit_bias, a seed that makes a request reproducible, and logprobs
with top alternatives taken from the model's raw distribution.

So the engine gets a single processor, ``Sampler``. Each batch row carries
the request's slot number (the only per-request tensor argument); the
sampler looks the request up, picks the next token itself and returns a
one-hot row (0 for the chosen token, -inf elsewhere), so the engine's own
sampling step can only take that token. The pick, its logprob and the top
alternatives wait in the slot until the pump thread reads them.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from broker.schemas import Sampling

log = logging.getLogger("llmq.worker.sampler")

SLOT_KWARG = "llmq_slot"
GREEDY_BELOW = 1e-5
NO_SLOT = -1


@dataclass(frozen=True)
class Pick:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Slot:
    sampling: Sampling
    vocab_size: int
    seed: int | None = None
    counts: dict[int, int] = field(default_factory=dict)  # output token -> times generated
    picks: deque[Pick] = field(default_factory=deque)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(self.seed)

    @property
    def wants_logprobs(self) -> bool:
        return self.sampling.logprobs is not None

    def take(self, n: int) -> list[Pick]:
        """The picks of the ``n`` tokens the engine has since delivered."""
        return [self.picks.popleft() for _ in range(min(n, len(self.picks)))]


class Sampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {SLOT_KWARG: int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._slots: dict[int, Slot] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    # ------------------------------------------------------ slot lifecycle

    def open(self, sampling: Sampling, seed: int | None) -> tuple[int, Slot]:
        slot = Slot(sampling=sampling, vocab_size=self.vocab_size, seed=seed)
        with self._lock:
            sid = next(self._ids) % (2**31 - 1)
            self._slots[sid] = slot
        return sid, slot

    def close(self, sid: int) -> None:
        with self._lock:
            self._slots.pop(sid, None)

    # ----------------------------------------------- transformers' protocol

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(NO_SLOT)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        ids = [r.state.logit_processor_kwargs.get(SLOT_KWARG, NO_SLOT) for r in requests_with_new_token]
        return torch.tensor(ids, dtype=torch.int32, device="cpu")

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = scores.size(0)
        sids = tensor_arg[:rows].tolist()
        with self._lock:
            slots = [self._slots.get(s) for s in sids]
        scores = scores.float()
        # Logprobs are the model's own distribution, before penalties and temperature.
        raw_logprobs = torch.log_softmax(scores, dim=-1) if any(s and s.wants_logprobs for s in slots) else None
        picked = torch.empty(rows, dtype=torch.long)
        for row, slot in enumerate(slots):
            if slot is None:  # a request not opened by llmq (none today): greedy
                picked[row] = int(scores[row].argmax())
                continue
            try:
                tok = self._pick(scores[row], slot)
            except RuntimeError:
                # An exception here would kill the engine thread for every job;
                # degrade this row to greedy and say so.
                log.exception("sampling failed for slot %s; taking the greedy token", sids[row])
                tok = int(scores[row].argmax())
            picked[row] = tok
            slot.counts[tok] = slot.counts.get(tok, 0) + 1
            lp = 0.0
            top: tuple[tuple[int, float], ...] = ()
            if raw_logprobs is not None and slot.wants_logprobs:
                lp = float(raw_logprobs[row, tok])
                n_top = slot.sampling.logprobs or 0
                if n_top:
                    values, indices = raw_logprobs[row].topk(n_top)
                    top = tuple(zip(indices.tolist(), values.tolist()))
            slot.picks.append(Pick(tok, lp, top))
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picked.to(scores.device).unsqueeze(1), 0.0)
        return out

    def _pick(self, logits: torch.Tensor, slot: Slot) -> int:
        s = slot.sampling
        x = logits
        if s.logit_bias:
            idx = torch.tensor(list(s.logit_bias.keys()), dtype=torch.long, device=x.device)
            x = x.index_add(0, idx, torch.tensor(list(s.logit_bias.values()), dtype=x.dtype, device=x.device))
        if slot.counts and (s.presence_penalty or s.frequency_penalty):
            idx = torch.tensor(list(slot.counts.keys()), dtype=torch.long, device=x.device)
            n = torch.tensor(list(slot.counts.values()), dtype=x.dtype, device=x.device)
            x = x.index_add(0, idx, -(s.frequency_penalty * n + s.presence_penalty))
        if s.temperature < GREEDY_BELOW:  # tiny temperatures overflow float32: greedy, as vLLM does
            return int(x.argmax())
        x = x / s.temperature
        if 0 < s.top_k < x.numel():
            kth = x.topk(s.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_x, order = x.sort(descending=True)
            cum = sorted_x.softmax(-1).cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            drop = cum - sorted_x.softmax(-1) >= s.top_p
            x = x.scatter(0, order[drop], float("-inf"))
        probs = x.softmax(-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=slot.generator))


def install(manager: Any, sampler: Sampler) -> None:
    """Make ``sampler`` the engine's only logits processor (before start)."""
    from transformers.generation.logits_process import LogitsProcessorList

    procs = manager.logit_processor
    procs.logits_processor = LogitsProcessorList([sampler])
    procs.tensors_required = 1
    procs.supported_keys = dict(Sampler.supported_kwargs)
    procs.ignored_keys = set()
    procs.do_processing = True
