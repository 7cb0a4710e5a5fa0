"""Per-request sampling on transformers' continuous batching.

transformers decides ``do_sample`` once per engine, so the engine always
samples and each request carries temperature, top_p and top_k. Temperature 0
must mean greedy, which dividing logits by 0 cannot give: ``GreedyAwareTemperature``
turns the rows of temperature-0 requests into a one-hot on their argmax, so
the sampler can only pick that token.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper,
)

from broker.schemas import Sampling

# Placeholders that make transformers build the three per-request processors;
# every request overrides them with its own values.
ENGINE_TEMPERATURE = 0.7
ENGINE_TOP_P = 0.99


class GreedyAwareTemperature(ContinuousBatchingTemperatureLogitsWarper):
    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temps = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        greedy = temps <= 0
        scores = scores / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(-1)
        if bool(greedy.any()):
            best = scores.argmax(dim=-1, keepdim=True)
            one_hot = torch.full_like(scores, float("-inf")).scatter_(-1, best, 0.0)
            scores = torch.where(greedy.unsqueeze(-1), one_hot, scores)
        return scores


def install_greedy_temperature(manager: Any) -> None:
    """Swap the engine's temperature processor for the greedy-aware one."""
    procs = manager.logit_processor.logits_processor
    for i, proc in enumerate(procs):
        if isinstance(proc, ContinuousBatchingTemperatureLogitsWarper):
            replacement = GreedyAwareTemperature.__new__(GreedyAwareTemperature)
            replacement.__dict__.update(proc.__dict__)
            procs[i] = replacement
            return
    raise RuntimeError("the engine has no temperature processor to make greedy-aware")


def request_kwargs(s: Sampling, vocab_size: int) -> dict[str, Any]:
    """The per-request processor arguments for one job."""
    return {
        "temperature": float(s.temperature),
        "top_p": float(s.top_p),
        "top_k": int(s.top_k) if s.top_k > 0 else vocab_size,
    }
