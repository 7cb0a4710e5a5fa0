"""The paged KV cache of one model, with prefix caching.

Every layer's keys and values live in one flat tensor of ``num_blocks *
block_size`` token rows; a sequence owns a list of blocks, so its token at
position ``p`` sits in row ``blocks[p // block_size] * block_size + p %
block_size``. Memory is taken block by block as sequences grow, never
reserved for a request's whole ``max_tokens``.

Prefix caching: once a block is full and computed, it is filed under a hash
of every token up to its end (a chain: the hash of the block before, then
this block's tokens). A new sequence whose prompt starts with the same
tokens shares those blocks instead of computing them again: turn 2 of a chat
repeats turn 1's prompt and answer. Blocks nobody holds keep their hash and
are reused last-freed-last, so a cached prefix survives until memory is
actually needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


def chain_hash(previous: int | None, tokens: Sequence[int]) -> int:
    return hash((previous, tuple(tokens)))


class KVCache:
    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str, prefix_caching: bool = True) -> None:
        rows = num_blocks * block_size
        self.keys = [torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(rows, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never hashed: taken first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> chain hash of the tokens up to its end
        self._by_hash: dict[int, int] = {}  # chain hash -> block
        self._cached: OrderedDict[int, None] = OrderedDict()  # hashed blocks nobody holds, oldest first

    def __repr__(self) -> str:
        return (f"KVCache(blocks={self.num_blocks}, block_size={self.block_size}, free={self.available()}, "
                f"prefix_caching={self.prefix_caching})")

    def available(self) -> int:
        return len(self._free) + len(self._cached)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int | None:
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)  # evict the least recently used cached prefix
            del self._by_hash[self._hash_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def match_prefix(self, tokens: Sequence[int], salt: int | None = None) -> tuple[list[int], list[int]]:
        """The cached blocks that start ``tokens``, now held by the caller,
        and their chain hashes. The last token is never matched: its logits
        are what the sequence needs next, so at least one token is computed.
        ``salt`` starts the chain: a LoRA adapter's keys and values are its
        own, so its blocks never match the base's or another adapter's."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.prefix_caching:
            return blocks, hashes
        bs = self.block_size
        h: int | None = salt
        for i in range((len(tokens) - 1) // bs):
            h = chain_hash(h, tokens[i * bs : (i + 1) * bs])
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
            blocks.append(block)
            hashes.append(h)
        return blocks, hashes

    def file_full_blocks(self, tokens: Sequence[int], blocks: Sequence[int], hashes: list[int], computed: int,
                         salt: int | None = None) -> None:
        """File every block of a sequence that is full and computed under its
        chain hash (``hashes`` is the sequence's list, extended here)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(hashes) < computed // bs:
            i = len(hashes)
            h = chain_hash(hashes[-1] if hashes else salt, tokens[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = blocks[i]
            if h not in self._by_hash and block not in self._hash_of:  # an identical block may be filed already
                self._by_hash[h] = block
                self._hash_of[block] = h

    def rows(self, blocks: Sequence[int], start: int, stop: int) -> list[int]:
        """Cache rows of positions ``start..stop-1`` of one sequence (the rows
        a step writes: a handful per sequence)."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, stop)]

    def read_index(self, tables: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache rows of the first ``lengths[i]`` positions of each
        sequence, padded to the longest (``[n, longest]``), and the mask that
        says which are real (``[n, longest]``, bool)."""
        bs = self.block_size
        longest = max(lengths)
        width = self.blocks_for(longest)
        table = torch.tensor([list(t[:width]) + [0] * (width - len(t[:width])) for t in tables], dtype=torch.long)
        pos = torch.arange(longest)
        index = table[:, pos // bs] * bs + pos % bs
        mask = pos.unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        return index, mask
