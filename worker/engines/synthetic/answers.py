"""What the synthetic engine answers, as the text pieces of its tokens.

Free text is the engine's passage (``words.PASSAGE``), cycled from an offset
(0 when greedy; seeded per choice otherwise, so ``n`` choices differ). A job
that constrains its answer gets one that holds: a JSON value that matches
its schema (``instance``), the first of its choices, or a tool call in the
worker's tool format when ``tool_choice`` asks for one. Regex and EBNF
grammars need a real sampler: ``check`` refuses them."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

from broker.schemas import Job
from worker.engines.protocol import Refused
from worker.toolcalls import ToolFormat

# A schema nested deeper than this gets null below it (a recursive $ref).
MAX_DEPTH = 8
CHOSEN_LOGPROB = -0.25  # every token's, as reported: the engine samples nothing


# A piece of text and the token id it ends with (what logit_bias names).
Piece = tuple[str, int]


def pieces_of(tokenizer: Any, text: str) -> list[Piece]:
    """``text`` as the text of each of its tokens: together they are exactly
    ``text`` (each piece is what decoding one more token adds)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces: list[Piece] = []
    before = ""
    for k in range(1, len(ids) + 1):
        now = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if not now.startswith(before) or now.endswith("\ufffd"):
            continue  # the token ends inside a character: its bytes come with the next one
        pieces.append((now[len(before):], ids[k - 1]))
        before = now
    if before != text and text.startswith(before):
        pieces.append((text[len(before):], ids[-1]))
    if "".join(p for p, _ in pieces) != text:  # a prefix's decoding is not a prefix: as many even slices
        size = -(-len(text) // max(1, len(ids)))
        pieces = [(text[i:i + size], ids[min(i // size, len(ids) - 1)]) for i in range(0, len(text), size)]
    return pieces


def check(job: Job) -> None:
    c = job.constraint
    if c is not None and c.kind in ("regex", "grammar"):
        raise Refused(f"'{c.param}': {c.kind} structured outputs are not supported by this model's engine "
                      "(synthetic: it generates no tokens, it plays back text); use a JSON schema or choices.",
                      c.param)


def fixed_text(job: Job, index: int, tool_format: ToolFormat) -> str | None:
    """The whole answer of a constrained choice; None: free text."""
    if job.tools and job.tool_choice in ("required", "function"):
        tool = next((t for t in job.tools if job.tool_choice != "function" or t.function.name == job.tool_name),
                    job.tools[0])
        arguments = instance(tool.function.parameters or {"type": "object"})
        return f"{tool_format.prefix}{tool.function.name}{tool_format.middle}{json.dumps(arguments)}{tool_format.suffix}"
    c = job.constraint
    if c is None:
        return None
    if c.kind == "choice" and c.choices:
        return c.choices[0] if job.sampling.temperature == 0 else _rng(job, index).choice(c.choices)
    if c.kind == "json":
        return json.dumps(instance(c.json_schema) if c.json_schema is not None else {"answer": "synthetic"})
    return None


def free_text(job: Job, index: int, passage: list[Piece], banned: set[int]) -> Iterator[Piece]:
    """The passage's pieces, forever, from the choice's offset, passing over
    the tokens ``logit_bias`` bans (unless it bans them all)."""
    i = 0 if job.sampling.temperature == 0 else _rng(job, index).randrange(len(passage))
    everything = all(token in banned for _, token in passage)
    while True:
        piece = passage[i]
        i = (i + 1) % len(passage)
        if everything or piece[1] not in banned:
            yield piece


def top_logprobs(chosen: str, k: int, passage: list[Piece], at: int) -> list[tuple[str, float]]:
    """``k`` alternatives, most likely first: the chosen piece, then other
    pieces of the passage, each less likely than the one before."""
    top = [(chosen, CHOSEN_LOGPROB)]
    for j in range(len(passage)):
        if len(top) >= k:
            break
        other = passage[(at + j) % len(passage)][0]
        if all(other != seen for seen, _ in top):
            top.append((other, CHOSEN_LOGPROB - len(top)))
    return top[:k]


def _rng(job: Job, index: int) -> random.Random:
    return random.Random(None if job.sampling.seed is None else job.sampling.seed + index)


def instance(schema: dict[str, Any], root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A value that the JSON schema ``schema`` accepts, as plain as may be:
    every listed property, the fewest items, the lowest numbers allowed."""
    root = schema if root is None else root
    if depth > MAX_DEPTH:
        return None
    if "$ref" in schema:
        return instance(_resolve(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return instance(options[0], root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: instance(sub, root, depth + 1) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        items = schema.get("items") or {}
        count = max(int(schema.get("minItems", 1)), 0)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [instance(items, root, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = low + 1 if "exclusiveMinimum" in schema and "minimum" not in schema else low
        value = min(value, schema.get("maximum", value))
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema)


_FORMATS = {"date": "2026-01-01", "date-time": "2026-01-01T00:00:00Z", "time": "00:00:00", "email": "user@example.com",
            "uuid": "00000000-0000-4000-8000-000000000000", "uri": "https://example.com/"}


def _string(schema: dict[str, Any]) -> str:
    text = _FORMATS.get(schema.get("format", ""), "synthetic")
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    text = text + "x" * max(0, low - len(text))
    return text[: int(high)] if high is not None else text


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    """A local reference (``#/$defs/Name``); any other is taken as any value."""
    if not ref.startswith("#/"):
        return {}
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}
