"""``llmq bench capacity``: a short run against the stack it starts
(synthetic workers) and the floor gives figures for every process kind.
Speed is never asserted: the command prints it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_capacity_run_reports_every_process_kind(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "capacity.json"
    run = subprocess.run([sys.executable, "-m", "bench", "capacity", "--streams", "8", "--seconds", "3",
                          "--max-tokens", "16", "--step-ms", "10", "--logs", str(tmp_path / "logs"), "--json",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CPU per token: api" in run.stdout and "one API core carries about" in run.stdout
    llmq, floor = json.loads(out.read_text())["sides"]
    assert (llmq["name"], floor["name"]) == ("llmq", "floor")
    for side in (llmq, floor):
        assert side["load"]["errors"] == 0 and side["load"]["output_tokens"] >= 16
        assert side["load"]["output_tokens"] % 16 == 0  # every answer ran to max_tokens
    assert set(llmq["us_per_token"]) == {"api", "worker", "redis", "loadgen"}
    assert all(v > 0 for v in llmq["us_per_token"].values())
