"""Attention over llmq's paged KV cache, plugged into transformers' models.

The engine runs the model's own forward on one flat sequence of the step's
tokens (``input_ids`` of shape ``[1, T]``): first one token per decoding
sequence, then the prompt chunks of sequences being prefilled. Every op but
attention works token by token, so only attention needs to know where one
sequence ends and the next begins. transformers lets a model's attention be
swapped by name (``AttentionInterface``); with no KV cache object passed,
each layer hands its new keys and values straight to ``paged_attention``,
which writes them into the cache and attends over each sequence's own rows.

Decoding rows are one batched SDPA call (queries ``[B, H, 1, D]`` against
each row's gathered keys, padded and masked); each prefill chunk is one SDPA
call with a causal mask offset by the tokens already cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from worker.engines.transformers.kvcache import KVCache

NAME = "llmq_paged"
STEP_KWARG = "llmq_step"


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """A prefill chunk: ``length`` query tokens at ``start`` in the step's
    flat sequence, attending over the ``read`` rows of its sequence. A chunk
    that begins its sequence (no ``read``) attends over its own new keys
    alone: nothing to gather, and SDPA's causal path skips the masked half."""

    start: int
    length: int
    read: torch.Tensor | None = None  # [keys] cache rows, position order
    mask: torch.Tensor | None = None  # [1, 1, length, keys] bool, causal with the cached offset


@dataclass(frozen=True, kw_only=True)
class StepLayout:
    """Where each token of one engine step goes; built once per step, shared by every layer."""

    cache: KVCache
    write: torch.Tensor  # [T] cache row of each new token
    decode: int  # the first ``decode`` tokens are one per decoding sequence
    decode_read: torch.Tensor | None  # [decode, keys] cache rows per decoding sequence (padded)
    decode_mask: torch.Tensor | None  # [decode, 1, 1, keys] bool
    chunks: tuple[Chunk, ...] = ()


def _gather(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cache rows ``[..., keys]`` as ``[..., kv_heads, keys, head_dim]``."""
    out = flat.index_select(0, rows.reshape(-1)).view(*rows.shape, *flat.shape[1:])
    return out.transpose(-3, -2)


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    step: StepLayout = kwargs[STEP_KWARG]
    layer = module.layer_idx
    cache = step.cache
    if cache.keys[layer].device != key.device:  # a model spread over GPUs: each layer's cache moves to it, once
        cache.keys[layer], cache.values[layer] = cache.keys[layer].to(key.device), cache.values[layer].to(key.device)
    keys, values = cache.keys[layer], cache.values[layer]
    # [1, kv_heads, T, D] -> [T, kv_heads, D], one row per new token
    write = step.write.to(key.device)  # no-op unless the model is spread over devices
    keys.index_copy_(0, write, key[0].transpose(0, 1))
    values.index_copy_(0, write, value[0].transpose(0, 1))
    q = query[0]  # [H, T, D]
    parts: list[torch.Tensor] = []
    if step.decode:
        assert step.decode_read is not None
        qd = q[:, : step.decode].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        read, mask = step.decode_read.to(key.device), step.decode_mask.to(key.device)  # type: ignore[union-attr]
        out = F.scaled_dot_product_attention(qd, _gather(keys, read), _gather(values, read), attn_mask=mask,
                                             scale=scaling, enable_gqa=True)
        parts.append(out.squeeze(2))  # [B, H, D]
    for c in step.chunks:
        span = slice(c.start, c.start + c.length)
        qc = q[:, span].unsqueeze(0)  # [1, H, n, D]
        if c.read is None:
            out = F.scaled_dot_product_attention(qc, key[:, :, span], value[:, :, span], is_causal=True,
                                                 scale=scaling, enable_gqa=True)
        else:
            read = c.read.to(key.device)
            out = F.scaled_dot_product_attention(qc, _gather(keys, read).unsqueeze(0),
                                                 _gather(values, read).unsqueeze(0), attn_mask=c.mask.to(key.device),
                                                 scale=scaling, enable_gqa=True)
        parts.append(out[0].transpose(0, 1))  # [n, H, D]
    return torch.cat(parts).unsqueeze(0), None  # [1, T, H, D], as transformers' sdpa returns it


AttentionInterface.register(NAME, paged_attention)
