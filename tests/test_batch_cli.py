"""``llmq batch`` end to end (the real CLI in a subprocess, against the session
stack: real Redis, API and a worker with the demo model), its pure helpers,
and the arithmetic of ``python -m bench priority``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import typer
from openai.types import Batch

from bench.priority import FINAL, Sample, batch_jsonl, batch_rate, ttft_ratio
from bench.stats import Figures, RequestResult, summarise
from cli.batch import describe_batch, parse_metadata, summary
from tests.conftest import Stack
from tests.procs import NO_END_BIAS, ROOT

WAIT_S = 240  # a few 8-token lines on the demo model; generous, since other tests may share the 2 cores


def llmq(*args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"})


def lines(model: str, n: int, max_tokens: int = 8, **extra: object) -> list[dict[str, object]]:
    return [{"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"Say {i}."}],
                      "max_tokens": max_tokens, "temperature": 0, **extra}}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0)


# -- end to end ---------------------------------------------------------------------

@pytest.mark.e2e
def test_submit_wait_status_results(stack: Stack, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", lines(stack.model, 4))
    done = llmq("batch", "submit", str(src), "--endpoint", "/v1/chat/completions", "--metadata", "run=cli-test",
                "--metadata", "eq=a=b", "--wait", "--base-url", stack.v1)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    batch_id = out[0]
    assert batch_id.startswith("batch_")
    assert out[-1] == f"{batch_id} completed: 4 completed, 0 failed of 4"
    assert "uploaded" in done.stderr and "Traceback" not in done.stderr

    batch = client(stack).batches.retrieve(batch_id)
    assert batch.status == "completed" and batch.metadata == {"run": "cli-test", "eq": "a=b"}
    assert batch.output_file_id

    shown = llmq("batch", "status", batch_id, "--base-url", stack.v1)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split(None, 1)[1] for line in shown.stdout.splitlines() if line.strip()}
    assert rows["status"] == "completed"
    assert rows["requests"] == "4 total, 4 completed, 0 failed"
    assert rows["input_file_id"] == batch.input_file_id and rows["output_file_id"] == batch.output_file_id
    assert "created_at" in rows and "completed_at" in rows and "errors:" not in shown.stdout

    out_file, err_file = tmp_path / "out" / "results.jsonl", tmp_path / "errors.jsonl"
    got = llmq("batch", "results", batch_id, "-o", str(out_file), "--errors", str(err_file), "--base-url", stack.v1)
    assert got.returncode == 0, got.stderr
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"q-{i}" for i in range(4)]
    for r in results:
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and 0 < body["usage"]["completion_tokens"] <= 8
    assert err_file.read_text() == ""  # no line failed
    assert "wrote 4 lines" in got.stderr


@pytest.mark.e2e
def test_failed_batch_exits_1_and_status_names_the_line(stack: Stack, tmp_path: Path) -> None:
    good = [json.dumps(r) for r in lines(stack.model, 3)]
    src = tmp_path / "broken.jsonl"
    src.write_text(f"{good[0]}\n{{not json\n{good[2]}\n")
    done = llmq("batch", "submit", str(src), "--wait", "--base-url", stack.v1)
    assert done.returncode == 1, (done.stdout, done.stderr)
    batch_id = done.stdout.splitlines()[0]
    assert done.stdout.splitlines()[-1].startswith(f"{batch_id} failed:")

    batch = client(stack).batches.retrieve(batch_id)
    assert batch.status == "failed" and batch.errors and batch.errors.data
    line = batch.errors.data[0].line
    assert line is not None  # the broken line, as the server numbers it
    shown = llmq("batch", "status", batch_id, "--base-url", stack.v1)
    assert shown.returncode == 0
    assert "errors:" in shown.stdout and f"  line {line}" in shown.stdout
    assert f"line {line}" in done.stderr

    nothing = llmq("batch", "results", batch_id, "-o", str(tmp_path / "out.jsonl"), "--base-url", stack.v1)
    assert nothing.returncode == 1 and "no output file" in nothing.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.e2e
def test_results_of_a_running_batch_is_refused(stack: Stack, tmp_path: Path) -> None:
    # Long answers that cannot end early, so the batch is still running when results is asked.
    src = write_jsonl(tmp_path / "long.jsonl", lines(stack.model, 4, max_tokens=400, logit_bias=NO_END_BIAS))
    made = llmq("batch", "submit", str(src), "--base-url", stack.v1)
    assert made.returncode == 0, made.stderr
    batch_id = made.stdout.strip()
    try:
        got = llmq("batch", "results", batch_id, "-o", str(tmp_path / "out.jsonl"), "--base-url", stack.v1)
        assert got.returncode == 1
        assert "not finished" in got.stderr and batch_id in got.stderr
        assert not (tmp_path / "out.jsonl").exists()
    finally:
        client(stack).batches.cancel(batch_id)


@pytest.mark.e2e
def test_server_error_is_one_line(stack: Stack) -> None:
    got = llmq("batch", "status", "batch_doesnotexist", "--base-url", stack.v1, timeout=60)
    assert got.returncode == 1
    assert got.stderr.startswith("error: 404") and len(got.stderr.strip().splitlines()) == 1
    assert "Traceback" not in got.stderr


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", lines("m", 1))
    got = llmq("batch", "submit", str(src), "--base-url", "http://127.0.0.1:9/v1", timeout=60)
    assert got.returncode == 1 and got.stdout == ""
    assert got.stderr.startswith("error: cannot reach") and "Traceback" not in got.stderr


# -- the CLI's pure helpers ---------------------------------------------------------

def test_parse_metadata() -> None:
    assert parse_metadata(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in ("novalue", "=v"):
        with pytest.raises(typer.BadParameter):
            parse_metadata([bad])


def test_describe_failed_batch_lists_errors_with_lines() -> None:
    batch = Batch.model_validate({
        "id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-in",
        "completion_window": "24h", "status": "failed", "created_at": 1_700_000_000, "failed_at": 1_700_000_005,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": {"k": "v"},
        "errors": {"object": "list", "data": [
            {"code": "invalid_json_line", "line": 2, "message": "not JSON", "param": None},
            {"code": "mismatched_model", "line": 5, "message": "another model", "param": "body.model"}]}})
    text = "\n".join(describe_batch(batch))
    assert "status          failed" in text and "metadata        k=v" in text
    assert "output_file_id" not in text  # empty fields are left out
    assert "  line 2 [invalid_json_line]: not JSON" in text
    assert "  line 5 [mismatched_model]: another model (param body.model)" in text
    assert summary(batch) == "batch_1 failed: 0 completed, 0 failed of 0"


# -- bench priority's arithmetic -------------------------------------------------------

def test_batch_rate_counts_completed_lines_only() -> None:
    a = Sample(t=10.0, completed=100, failed=2, total=2000, status="in_progress")
    b = Sample(t=14.0, completed=180, failed=5, total=2000, status="in_progress")
    r = batch_rate(a, b)
    assert (r.seconds, r.completed, r.failed, r.ended) == (4.0, 80, 3, False)
    assert r.lines_per_s == pytest.approx(20.0)
    # Out of lines, or final: the rate is only a lower bound.
    assert batch_rate(a, Sample(15.0, 1990, 10, 2000, "finalizing")).ended
    assert batch_rate(a, Sample(15.0, 500, 2, 2000, "cancelled")).ended and "cancelled" in FINAL
    assert batch_rate(a, Sample(10.0, 100, 2, 2000, "in_progress")).lines_per_s is None


def test_ttft_ratio() -> None:
    def figs(ttfts: list[float]) -> Figures:
        rs = [RequestResult(t_send=0.0, t_first=t, chunk_times=[t], completion_tokens=1) for t in ttfts]
        return summarise("x", rs, wall_s=1.0, concurrency=1, max_tokens=1)

    idle, busy = figs([0.1, 0.2, 0.3]), figs([0.3, 0.4, 0.5])
    assert ttft_ratio(busy, idle) == pytest.approx(2.0)
    assert ttft_ratio(busy, figs([])) is None


def test_batch_jsonl_lines_are_distinct_chat_requests() -> None:
    rows = [json.loads(line) for line in batch_jsonl("m", 12, 32).decode().splitlines()]
    assert len(rows) == 12 and len({r["custom_id"] for r in rows}) == 12
    assert len({r["body"]["messages"][0]["content"] for r in rows}) == 12
    assert all(r["url"] == "/v1/chat/completions" and r["method"] == "POST" for r in rows)
    assert all(r["body"]["model"] == "m" and r["body"]["max_tokens"] == 32 for r in rows)
