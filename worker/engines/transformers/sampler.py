"""Token choice for a whole engine step at once.

The engine hands ``Sampler.sample`` the logits of every row that needs a
next token, ``[R, vocab]``, and each row's ``Slot`` (the request's sampling
options and state). The choice is one set of tensor operations over the
batch, whatever mix of options the rows carry:

1. logit_bias and presence/frequency penalties are added as ``[R, vocab]``
   tensors (penalties count the request's own output tokens, kept in one
   shared counts tensor, a row per open slot);
2. greedy rows (temperature below 1e-5: tiny temperatures overflow float32)
   take one argmax;
3. the other rows are divided by their temperature, cut by top-k and top-p
   on one sort, and drawn by inverse transform: one uniform number per row
   against the row's cumulative distribution (a multinomial draw); a seeded
   row draws its number from its own generator, so it is reproducible
   whatever else is batched;
4. logprobs (and the top alternatives) come from the model's raw
   distribution, before penalties and temperature, as OpenAI reports them.

Rows with a grammar (structured outputs, tool calls: ``grammars.py``)
have the tokens it forbids masked after step 1, all such rows in one call;
each picked token then advances its row's matcher. Rows without one pay
nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from broker.schemas import Sampling

if TYPE_CHECKING:
    from worker.engines.transformers.grammars import Grammars

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Pick:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Slot:
    """One request's sampling state while it runs."""

    sampling: Sampling
    row: int  # its row in the sampler's counts tensor
    generator: torch.Generator | None = None
    bias: torch.Tensor | None = None  # [vocab], from logit_bias
    matcher: Any = None  # an xgrammar GrammarMatcher when the output is constrained
    picks: deque[Pick] = field(default_factory=deque)  # waiting for the pump thread

    @property
    def wants_logprobs(self) -> bool:
        return self.sampling.logprobs is not None

    @property
    def penalized(self) -> bool:
        return bool(self.sampling.presence_penalty or self.sampling.frequency_penalty)

    def take(self, n: int) -> list[Pick]:
        """The picks of the ``n`` tokens the engine has since delivered."""
        return [self.picks.popleft() for _ in range(min(n, len(self.picks)))]


class Sampler:
    def __init__(self, vocab_size: int, rows: int = 64, grammars: Grammars | None = None) -> None:
        self.vocab_size = vocab_size
        self.grammars = grammars
        self._counts = torch.zeros(rows, vocab_size)  # output tokens so far, per slot row
        self._free_rows = list(range(rows - 1, -1, -1))

    def open(self, sampling: Sampling, seed: int | None) -> Slot:
        """A slot for one choice of one request (called from worker threads
        before the engine sees it; the engine thread alone samples)."""
        if not self._free_rows:  # more slots open than rows: double the table
            n = self._counts.size(0)
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        row = self._free_rows.pop()
        self._counts[row].zero_()
        slot = Slot(sampling=sampling, row=row)
        if seed is not None:
            slot.generator = torch.Generator(device="cpu")
            slot.generator.manual_seed(seed)
        if sampling.logit_bias:
            slot.bias = torch.zeros(self.vocab_size)
            ids = torch.tensor(list(sampling.logit_bias.keys()), dtype=torch.long)
            slot.bias.index_add_(0, ids, torch.tensor(list(sampling.logit_bias.values()), dtype=torch.float32))
        return slot

    def close(self, slot: Slot) -> None:
        self._free_rows.append(slot.row)
        slot.matcher = None  # a cancelled or finished request frees its grammar state

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, slots: list[Slot]) -> list[int]:
        raw = logits.float().cpu()
        penalized = [i for i, s in enumerate(slots) if s.penalized]
        counts_rows = torch.tensor([slots[i].row for i in penalized], dtype=torch.long)
        x = self._adjust(raw, slots, penalized, counts_rows)
        constrained = [(i, s.matcher) for i, s in enumerate(slots) if s.matcher is not None]
        if constrained:
            assert self.grammars is not None
            x = x.clone() if x is raw else x  # logprobs are read from the raw logits
            self.grammars.apply_masks(x, constrained)
        temps = torch.tensor([s.sampling.temperature for s in slots])
        hot = temps >= GREEDY_BELOW
        if not bool(hot.any()):
            tokens = x.argmax(-1)
        else:
            tokens = torch.empty(len(slots), dtype=torch.long)
            greedy, sampled = (~hot).nonzero().squeeze(1), hot.nonzero().squeeze(1)
            if greedy.numel():
                tokens[greedy] = x[greedy].argmax(-1)
            tokens[sampled] = self._draw(x[sampled] / temps[sampled].unsqueeze(1), [slots[i] for i in sampled.tolist()])
        if penalized:
            self._counts.index_put_((counts_rows, tokens[penalized]), torch.ones(len(penalized)), accumulate=True)
        self._record_logprobs(raw, tokens, slots)
        picked = tokens.tolist()
        for i, matcher in constrained:
            if not matcher.accept_token(picked[i]):  # the mask allowed it, so this is a bug, not bad input
                raise RuntimeError(f"the grammar rejected token {picked[i]} that its own mask allowed")
        return picked

    def _adjust(self, x: torch.Tensor, slots: list[Slot], penalized: list[int],
                counts_rows: torch.Tensor) -> torch.Tensor:
        """Logits with each row's bias and penalties (rows ``penalized``, whose
        output counts are rows ``counts_rows`` of the counts tensor)."""
        biased = [i for i, s in enumerate(slots) if s.bias is not None]
        if not biased and not penalized:
            return x
        x = x.clone()
        if biased:
            x[biased] += torch.stack([slots[i].bias for i in biased])  # type: ignore[misc]
        if penalized:
            counts = self._counts[counts_rows]
            freq = torch.tensor([slots[i].sampling.frequency_penalty for i in penalized]).unsqueeze(1)
            pres = torch.tensor([slots[i].sampling.presence_penalty for i in penalized]).unsqueeze(1)
            x[penalized] -= freq * counts + pres * (counts > 0)
        return x

    def _draw(self, x: torch.Tensor, slots: list[Slot]) -> torch.Tensor:
        """One token per row of temperature-scaled logits ``x``."""
        vocab = x.size(1)
        top_k = torch.tensor([s.sampling.top_k if 0 < s.sampling.top_k < vocab else vocab for s in slots])
        top_p = torch.tensor([s.sampling.top_p for s in slots])
        if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
            sorted_x, order = x.sort(-1, descending=True)
            ranks = torch.arange(vocab).unsqueeze(0)
            drop = ranks >= top_k.unsqueeze(1)
            probs = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)
            x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
        cdf = x.softmax(-1).cumsum_(-1)
        u = torch.rand(len(slots), 1)
        for i, s in enumerate(slots):
            if s.generator is not None:  # seeded rows only: one draw each from their own stream
                u[i] = torch.rand(1, generator=s.generator)
        # The first token whose cumulative probability passes u: one uniform per
        # row, where multinomial or an exponential race over the vocabulary cost
        # 13-15 ms for 16 rows here. ``right`` never lands on a zero-probability token.
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=vocab - 1)

    def _record_logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, slots: list[Slot]) -> None:
        wanted = [i for i, s in enumerate(slots) if s.wants_logprobs]
        if not wanted:
            return
        idx = torch.tensor(wanted)
        lp = torch.log_softmax(raw[idx], dim=-1)
        chosen = lp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
        n_top = max(slots[i].sampling.logprobs or 0 for i in wanted)
        top_v, top_i = lp.topk(n_top, dim=-1) if n_top else (lp[:, :0], lp[:, :0].long())
        top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
        picked = tokens[idx].tolist()
        for j, i in enumerate(wanted):  # building the picks the pump thread will read
            n = slots[i].sampling.logprobs or 0
            slots[i].picks.append(Pick(picked[j], chosen[j], tuple(zip(top_i_l[j][:n], top_v_l[j][:n]))))
