"""Property-based: schemathesis generates requests from the API's own OpenAPI
schema (valid ones and, for the POST routes, invalid ones) and sends them to
the real stack. No response may be a 5xx, nor an SSE error event of type
server_error, and every response must match the schema the API declares for
its status (the /v1 routes declare their 200 model and OpenAI's error shape
for every other status).

Bounded in time: a fixed number of examples per operation, no shrinking, and
generation kept cheap (the real model's name, at most 4 new tokens, at most
2 choices) so a run takes a minute or two on two cores.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import Stack

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25  # per operation and generation mode
MAX_NEW_TOKENS = 4
MAX_CHOICES = 2
REQUEST_TIMEOUT_S = 60
# Past this, cases are still generated but no longer sent: the run stays
# bounded when other tests share the two cores (alone it takes about a minute).
BUDGET_S = 120
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def no_server_error_event(ctx: Any, response: Any, case: Case) -> None:
    """A stream answers 200 before it can fail: look at its events too."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    for line in response.content.decode().splitlines():
        if line.startswith("data: {") and '"error"' in line:
            error = json.loads(line[len("data: "):]).get("error", {})
            assert error.get("type") != "server_error", f"server error event in the stream: {error}"


CHECKS = [not_a_server_error, response_schema_conformance, no_server_error_event]


def tame(case: Case, model: str) -> None:
    """Keep valid generation requests cheap: the served model, few tokens, few
    choices. Values of the wrong type are left alone (they must get a 400)."""
    body = case.body
    if case.operation.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and body["model"]:
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and value > MAX_NEW_TOKENS:
            body[key] = MAX_NEW_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_NEW_TOKENS  # else up to 16 (completions) or the whole context (chat)
    if type(body.get("n")) is int and body["n"] > MAX_CHOICES:
        body["n"] = MAX_CHOICES


class Tally:
    """What a run sent and got back, for the summary."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.statuses: Counter[int] = Counter()
        self.cases: Counter[str] = Counter()
        self.skipped = 0


def explore(op: Any, mode: GenerationMode, stack: Stack, tally: Tally) -> None:
    """Up to MAX_EXAMPLES generated cases of one operation; raises on the first failure."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Case) -> None:
        if time.monotonic() > tally.deadline:
            tally.skipped += 1
            return
        tame(case, stack.model)
        response = case.call_and_validate(base_url=stack.base_url, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)
        tally.statuses[response.status_code] += 1
        tally.cases[f"{op.label} ({mode.value})"] += 1

    run()


def test_generated_requests_get_no_server_error_and_match_the_schema(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "GET /v1/models"):
        assert label in labels, labels

    started = time.monotonic()
    tally = Tally(BUDGET_S)
    failures: list[str] = []
    for op in operations:
        # Only bodies are made invalid (a POST with none, like a batch's cancel, has nothing to spoil).
        negative = op.method.upper() == "POST" and len(op.body) > 0
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negative else [])
        for mode in modes:
            try:
                explore(op, mode, stack, tally)
            except Exception as exc:  # noqa: BLE001 (one failing operation must not hide the others')
                failures.append(f"{op.label} ({mode.value}): {exc}")

    print(f"\nschemathesis {schemathesis.__version__}: {len(operations)} operations, {sum(tally.cases.values())} "
          f"cases in {time.monotonic() - started:.0f} s ({tally.skipped} more generated but not sent: over the "
          f"{BUDGET_S} s budget); statuses {dict(sorted(tally.statuses.items()))}")
    for label, n in sorted(tally.cases.items()):
        print(f"  {n:3d}  {label}")
    assert not failures, "\n\n".join(failures)
    assert all(status < 500 for status in tally.statuses)
