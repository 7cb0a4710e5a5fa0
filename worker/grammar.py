"""The grammar a job's output must follow, and the token masks that enforce it.

``spec_of`` reads a job's ``constraint`` (``response_format``, vLLM's
``structured_outputs``) or its tools into one engine-neutral ``GrammarSpec``.
The transformers engine compiles it with xgrammar (``Grammars``): once per
spec (xgrammar's compiler caches), in the Celery thread that submits the job,
never in the engine's step loop. Each choice then gets a matcher; every step
``apply_masks`` fills the masks of all constrained rows and applies them in
one call (xgrammar's CPU kernel), and rows without a constraint are not
touched. The vLLM engine hands the same spec to vLLM, which runs xgrammar
itself.

JSON is generated without free whitespace (``any_whitespace=False``): small
models otherwise fill a constrained answer with newlines until the token
limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xgrammar as xgr

from broker.schemas import Job
from worker.engines.base import Refused
from worker.toolcalls import ToolFormat

JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class GrammarSpec:
    """One job's output grammar. ``value``: a JSON schema (as text), a regex,
    an EBNF grammar, a structural tag (as JSON text), or for ``choice`` the
    JSON list of strings."""

    kind: Literal["json", "regex", "choice", "grammar", "structural_tag"]
    value: str
    param: str  # the request field it came from, named in a 400


def spec_of(job: Job, tools: ToolFormat) -> GrammarSpec | None:
    c = job.constraint
    if c is not None:
        if c.kind == "json":
            return GrammarSpec("json", json.dumps(c.json_schema or JSON_OBJECT), c.param)
        if c.kind == "regex":
            return GrammarSpec("regex", c.pattern or "", c.param)
        if c.kind == "choice":
            return GrammarSpec("choice", json.dumps(c.choices or []), c.param)
        return GrammarSpec("grammar", c.ebnf or "", c.param)
    if job.tools and job.tool_choice != "none":
        return GrammarSpec("structural_tag", json.dumps(tools.structural_tag(job)), "tools")
    return None


def choice_ebnf(choices: list[str]) -> str:
    """Exactly one of ``choices``: EBNF string literals take JSON's escapes."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def build(spec: GrammarSpec) -> xgr.Grammar:
    """The spec as an xgrammar grammar (no tokenizer needed); raises
    ``Refused`` (a 400 naming the request field) if xgrammar cannot build it."""
    try:
        if spec.kind == "json":
            return xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(spec.value)))
        if spec.kind == "grammar":
            return xgr.Grammar.from_ebnf(spec.value)
        return xgr.Grammar.from_structural_tag(spec.value)
    except Exception as exc:  # xgrammar raises RuntimeError, ValueError and its own errors alike
        raise _refusal(spec, exc) from exc


def check_spec(spec: GrammarSpec) -> None:
    """For engines that compile the grammar themselves (vLLM, llama.cpp):
    refuse what xgrammar cannot build before it reaches them."""
    build(spec)


def _refusal(spec: GrammarSpec, exc: Exception) -> Refused:
    what = {"json": "JSON schema", "regex": "regular expression", "choice": "choice list", "grammar": "grammar",
            "structural_tag": "tool parameters schema"}[spec.kind]
    detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return Refused(f"'{spec.param}': the grammar library (xgrammar) cannot compile this {what}: {detail}",
                   spec.param, code="invalid_grammar")


class Grammars:
    """Compiled grammars of one model, and the bitmask buffer of its steps."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # One compile thread: a worker on a small machine needs its cores for the steps.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(16, vocab_size)

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """Raises ``Refused`` (a 400 naming the request field). The compiler
        caches by grammar: a spec seen before costs a lookup."""
        grammar = build(spec)
        try:
            return self._compiler.compile_grammar(grammar)
        except Exception as exc:
            raise _refusal(spec, exc) from exc

    @staticmethod
    def matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)

    def apply_masks(self, logits: torch.Tensor, rows: list[tuple[int, xgr.GrammarMatcher]]) -> None:
        """Mask, in place, every token each matcher forbids in its row of
        ``logits`` ([R, vocab], float32 on the CPU). The bits are unpacked
        with torch rather than xgrammar's ``apply_token_bitmask_inplace``:
        for 16 rows of the demo vocabulary (49k) that took 2.9 ms here
        against 0.8-1.7 ms."""
        if len(rows) > self._bitmask.size(0):
            self._bitmask = xgr.allocate_token_bitmask(len(rows) * 2, self.vocab_size)
        for j, (_, m) in enumerate(rows):
            m.fill_next_token_bitmask(self._bitmask, j)
        bits = self._bitmask[: len(rows)]
        allowed = ((bits.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(len(rows), -1)[:, : logits.size(1)]
        idx = torch.tensor([row for row, _ in rows])
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))


_SHIFTS = torch.arange(32, dtype=torch.int32)  # bit i of each 32-bit word is token 32 * word + i
