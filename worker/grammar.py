"""The grammar a job's output must follow, and the token masks that enforce it.

``spec_of`` reads a job's ``constraint`` (``response_format``, vLLM's
``structured_outputs``) or its tools into one engine-neutral ``GrammarSpec``.
The transformers engine compiles it with xgrammar
(``worker/engines/transformers/grammars.py``) and masks its rows' tokens
itself; the vLLM engine hands the same spec to vLLM, which runs xgrammar
itself; the llama.cpp engine sends JSON schemas to llama-server. ``build``
(and so ``check_spec``) refuses what xgrammar cannot compile, for them all.

JSON is generated without free whitespace (``any_whitespace=False``): small
models otherwise fill a constrained answer with newlines until the token
limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from broker.schemas import Job
from worker.engines.protocol import Refused
from worker.toolcalls import ToolFormat

if TYPE_CHECKING:
    import xgrammar as xgr

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
    import xgrammar as xgr  # here: a worker lists its engines without loading it (and torch, which it imports)

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
        raise refusal(spec, exc) from exc


def check_spec(spec: GrammarSpec) -> None:
    """For engines that compile the grammar themselves (vLLM, llama.cpp):
    refuse what xgrammar cannot build before it reaches them."""
    build(spec)


def refusal(spec: GrammarSpec, exc: Exception) -> Refused:
    what = {"json": "JSON schema", "regex": "regular expression", "choice": "choice list", "grammar": "grammar",
            "structural_tag": "tool parameters schema"}[spec.kind]
    detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return Refused(f"'{spec.param}': the grammar library (xgrammar) cannot compile this {what}: {detail}",
                   spec.param, code="invalid_grammar")
