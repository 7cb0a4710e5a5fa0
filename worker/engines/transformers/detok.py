"""Incremental detokenization.

Decoding the whole text each step costs O(n) per token; decoding only a small
window does not. The window starts a few tokens back (``prefix_offset``) so
tokenizers that drop a leading space on the first token of a decode still
produce exact text, and a delta is held back while it ends in U+FFFD, the
replacement character a multi-byte character split across tokens decodes to.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        # Seed the window with the prompt's tail so the first generated token
        # decodes with the spacing it has in context.
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text they complete (maybe empty)."""
        self._ids.extend(new_ids)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end of a job: whatever is still held back (a truly invalid
        byte sequence stays a replacement character, as a full decode gives)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
