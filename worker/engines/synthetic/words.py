"""The synthetic engine's own tokenizer, for a worker started with nothing
but a model name: one token a word of its word list (with the space before
it, as byte-level BPE writes it), anything else byte by byte, so every text
survives encode and decode, and its vocabulary stays fixed however many
new words the prompts bring. It offers what the worker asks of a Hugging
Face tokenizer: ``apply_chat_template``, ``encode``, ``decode``, ``len``
and the end token."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# What the engine says, cycled: plain English about what it is.
PASSAGE = (
    "This answer comes from the synthetic engine of llmq. It loads no weights and computes nothing: every step "
    "of its clock gives each running request one token of this text, at the pace its options set, so that a "
    "deployment can be measured before its accelerators arrive. Each token still travels the whole path of a "
    "real one: the worker publishes it to Redis, the API reads it from its reply channel and writes it to the "
    "client as a server-sent event. What a load test sees here is therefore the cost of the queue, the relay "
    "and the API alone, which is what the operators of a large fleet need to know when they plan how many API "
    "processes and how much Redis a given number of tokens per second will take. "
)

SPECIALS = ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
END = "<|end|>"
_BYTES = 256
_SPECIAL = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
_PIECE = re.compile(r"\s*\S+|\s+")  # a word with the white space before it, or trailing white space

# A template in the Jinja form Hugging Face's use: it shows which tool
# format the worker renders (llmq's generic one: ``worker/toolcalls.py``).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _vocabulary() -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    for word in PASSAGE.split():
        for piece in (word, f" {word}"):
            if piece not in seen:
                seen.add(piece)
                words.append(piece)
    return [*SPECIALS, *words]


class WordTokenizer:
    """Ids 0-255 are bytes; then the special tokens, then the words."""

    chat_template = CHAT_TEMPLATE

    def __init__(self) -> None:
        self._pieces = _vocabulary()
        self._ids = {p: _BYTES + i for i, p in enumerate(self._pieces)}
        self.eos_token_id = self._ids[END]
        self.eos_token = END

    def __len__(self) -> int:
        return _BYTES + len(self._pieces)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab={len(self)})"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for part in _SPECIAL.split(text):
            if part in self._ids and part in SPECIALS:
                ids.append(self._ids[part])
                continue
            for piece in _PIECE.findall(part):
                known = self._ids.get(piece)
                ids.extend([known] if known is not None else piece.encode())
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            if 0 <= i < _BYTES:
                pending.append(i)
                continue
            if pending:
                out.append(pending.decode(errors="replace"))
                pending.clear()
            piece = self._pieces[i - _BYTES]
            if not (skip_special_tokens and piece in SPECIALS):
                out.append(piece)
        if pending:
            out.append(pending.decode(errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **_: Any) -> list[int] | str:
        """``CHAT_TEMPLATE``, rendered without Jinja."""
        text = "".join(f"<|{m['role']}|>{m.get('content') or ''}{END}" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text) if tokenize else text
