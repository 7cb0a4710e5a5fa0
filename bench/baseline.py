"""The baseline: the same model in this process, no queue, one request at a
time, with the plain KV-cache decode loop FastChat's model_worker runs
(prefill once, then one token per forward pass). This is what llmq replaces,
so the HTTP run is judged by its ratio to this."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.stats import Figures, RequestResult, summarise


@dataclass(frozen=True)
class BaselineConfig:
    model_path: str
    prompt: str
    requests: int = 8
    max_tokens: int = 64
    temperature: float = 0.7
    dtype: str = "auto"
    device: str = "auto"
    seed: int | None = None
    warmup: int = 1


def load(cfg: BaselineConfig) -> Any:
    """Loaded exactly as a worker loads it (dtype auto is fp32 on CPU), so both
    runs multiply the same weights."""
    import torch

    from worker.loading import ModelSpec
    from worker.loading import load as load_model

    # Every core, so the baseline is not starved: torch's default is the physical
    # core count, which on hyper-threaded hosts is half of what the worker may use.
    torch.set_num_threads(os.cpu_count() or 1)
    return load_model(ModelSpec(path=cfg.model_path, dtype=cfg.dtype, device=cfg.device))  # type: ignore[arg-type]


def prompt_ids(lm: Any, prompt: str) -> list[int]:
    # The worker builds chat prompts exactly this way (worker/prompts.py).
    out = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def generate_one(lm: Any, prompt: str, max_tokens: int, temperature: float) -> RequestResult:
    import torch

    r = RequestResult(t_send=time.perf_counter())  # the clock includes the chat template, as the API's does
    ids = prompt_ids(lm, prompt)
    eos = set(lm.eos_token_ids)
    with torch.inference_mode():
        x = torch.tensor([ids], device=lm.device)
        out = lm.model(input_ids=x, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        n = 0
        finish = "length"
        while n < max_tokens:
            tok = _sample(logits, temperature)
            n += 1
            # Each token is its own "chunk": TTFT is prefill plus the first
            # sample, ITL the time of one decode step.
            now = time.perf_counter()
            r.t_first = r.t_first if r.t_first is not None else now
            r.chunk_times.append(now)
            if tok in eos:
                finish = "stop"  # the EOS token is counted, as the engine's usage counts it
                break
            if n == max_tokens:
                break
            out = lm.model(input_ids=torch.tensor([[tok]], device=lm.device), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
    r.t_end = time.perf_counter()
    r.completion_tokens, r.prompt_tokens, r.finish_reason = n, len(ids), finish
    return r


def _sample(logits: Any, temperature: float) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1))


def run(cfg: BaselineConfig, lm: Any | None = None) -> Figures:
    import torch

    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    owned = lm is None
    lm = lm or load(cfg)
    try:
        for _ in range(cfg.warmup):
            generate_one(lm, cfg.prompt, min(4, cfg.max_tokens), cfg.temperature)  # first forwards are slow
        t0 = time.perf_counter()
        results = [generate_one(lm, cfg.prompt, cfg.max_tokens, cfg.temperature) for _ in range(cfg.requests)]
        wall = time.perf_counter() - t0
    finally:
        if owned:
            # compare runs the HTTP stack next on the same cores: give the memory back.
            del lm
            gc.collect()
    return summarise("baseline", results, wall, 1, cfg.max_tokens)
