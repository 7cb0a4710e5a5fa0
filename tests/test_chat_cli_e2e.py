"""``llmq chat`` end to end: the real CLI in a pseudo-terminal (pexpect), so
rich renders Markdown with rich.live.Live as a user sees it, and through a
pipe, against the session stack (real Redis, API and worker with the demo
model). Each terminal session's raw output lands in test-artifacts/."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest
from openai import OpenAI

from cli.chat import ASSISTANT, PROMPT, first_chat_model
from tests.conftest import Stack
from tests.procs import ARTIFACTS, ROOT

pytestmark = pytest.mark.e2e

# CSI sequences (colours, cursor moves), OSC (titles, links), charset and keypad switches.
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78])")
TURN_S = 90  # one answer; generous, since other tests may share the 2 cores


def plain(raw: str) -> str:
    return ANSI.sub("", raw).replace("\r", "")


def words(text: str) -> str:
    """Letters and digits only: Markdown rendering, wrapping and Live's redraws
    change layout and punctuation, not the words."""
    return re.sub(r"[^0-9A-Za-z]", "", text)


def child_env() -> dict[str, str]:
    # A real terminal type, and no variables that would override the pty's
    # size or rich's colour detection.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")}
    return {**env, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}


def ignore_sigint() -> None:
    """The CLI starts with SIGINT ignored, as a background job of a
    non-interactive shell does (Python then leaves it ignored): its Ctrl-C
    must work all the same, however this test run was started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def terminal(stack: Stack, request: pytest.FixtureRequest) -> Iterator[pexpect.spawn]:
    max_tokens = getattr(request, "param", 24)
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / f"chat-{request.node.name}.log", "w", encoding="utf-8") as log:
        child = pexpect.spawn(sys.executable, ["-m", "cli.main", "chat", "--base-url", stack.v1, "--model", stack.model,
                                               "--temperature", "0", "--max-tokens", str(max_tokens)],
                              cwd=str(ROOT), env=child_env(), encoding="utf-8", codec_errors="replace",
                              dimensions=(50, 200), timeout=TURN_S, preexec_fn=ignore_sigint)
        child.logfile_read = log
        try:
            child.expect_exact(PROMPT, timeout=30)
            yield child
        finally:
            child.close(force=True)


def turn(child: pexpect.spawn, line: str) -> str:
    """Send one line, wait for the next prompt; what was printed in between.
    (History replayed by !!regen, !!load and !!remove styles its USER label,
    so the raw text PROMPT is only ever the prompt itself.)"""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return plain(child.before)


def answer_of(shown: str) -> str:
    assert f"{ASSISTANT}:" in shown, shown
    return shown.split(f"{ASSISTANT}:", 1)[1]


def test_terminal_session_turns_regen_save_load_remove(terminal: pexpect.spawn, tmp_path: Path) -> None:
    q1, q2 = "What is the capital of France?", "And of Italy?"
    a1 = answer_of(turn(terminal, q1))
    assert "Paris" in a1
    a2 = answer_of(turn(terminal, q2))
    assert words(a2)

    # !!regen shows the last question again and streams a new answer to it.
    shown = turn(terminal, "!!regen")
    assert q2 in shown.split(f"{ASSISTANT}:", 1)[0]
    a3 = answer_of(shown)
    assert words(a3)

    saved = tmp_path / "chat.json"
    assert "saved 4 messages" in turn(terminal, f"!!save {saved}")
    data = json.loads(saved.read_text())
    assert data["model"] and data["system"] is None
    msgs = data["messages"]
    # The regenerated answer replaced the old one: still two turns.
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [msgs[0]["content"], msgs[2]["content"]] == [q1, q2]
    # What was saved is what was shown.
    assert words(msgs[1]["content"]) and words(msgs[1]["content"]) in words(a1)
    assert words(msgs[3]["content"]) and words(msgs[3]["content"]) in words(a3)

    assert "conversation cleared" in turn(terminal, "!!reset")
    assert "saved 0 messages" in turn(terminal, f"!!save {tmp_path / 'empty.json'}")
    assert json.loads((tmp_path / "empty.json").read_text())["messages"] == []

    shown = turn(terminal, f"!!load {saved}")
    assert "loaded 4 messages" in shown
    assert q1 in shown and q2 in shown and words(msgs[3]["content"]) in words(shown)

    # !!remove acts on the restored history: the last turn goes, the first stays.
    assert "1 left" in turn(terminal, "!!remove")
    turn(terminal, f"!!save {tmp_path / 'after.json'}")
    assert json.loads((tmp_path / "after.json").read_text())["messages"] == msgs[:2]

    terminal.sendeof()  # Ctrl-D at the prompt ends the session
    terminal.expect(pexpect.EOF, timeout=15)
    terminal.close()
    assert terminal.exitstatus == 0


@pytest.mark.parametrize("terminal", [300], indirect=True)
def test_ctrl_c_stops_the_answer_and_keeps_the_session(terminal: pexpect.spawn, tmp_path: Path) -> None:
    terminal.sendline("Write a long story about a brave knight and a dragon.")
    terminal.expect_exact(ASSISTANT)
    terminal.expect(r"[A-Za-z]{4}")  # some of the story is on screen
    terminal.sendintr()
    terminal.expect_exact("(stopped)", timeout=30)
    terminal.expect_exact(PROMPT, timeout=30)

    assert "Paris" in answer_of(turn(terminal, "What is the capital of France?"))
    turn(terminal, f"!!save {tmp_path / 'chat.json'}")
    msgs = json.loads((tmp_path / "chat.json").read_text())["messages"]
    # The stopped answer is kept as far as it got; the session went on after it.
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert words(msgs[1]["content"])

    terminal.sendintr()  # Ctrl-C at the prompt ends the session
    terminal.expect(pexpect.EOF, timeout=15)
    terminal.close()
    assert terminal.exitstatus == 0


def run_piped(stack: Stack, text: str, *options: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cli.main", "chat", "--base-url", stack.v1, "--temperature", "0",
            "--max-tokens", "24", *options]
    return subprocess.run(argv, cwd=ROOT, env=child_env(), input=text, capture_output=True, text=True,
                          timeout=TURN_S, check=False)


def test_piped_output_is_plain_text(stack: Stack) -> None:
    done = run_piped(stack, "What is the capital of France?\n!!exit\n", "--model", stack.model)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "\x1b" not in done.stdout + done.stderr


def test_api_errors_are_one_line_and_the_session_goes_on(stack: Stack) -> None:
    done = run_piped(stack, "Hello\nHello again\n", "--model", "no-such-model")
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(ln.startswith("error: 404 model_not_found: ") for ln in lines), done.stderr


def test_default_model_is_a_served_chat_model(stack: Stack) -> None:
    model = first_chat_model(OpenAI(base_url=stack.v1, api_key="none"))
    cards = {c["id"]: c for c in httpx.get(f"{stack.v1}/models", timeout=5).json()["data"]}
    assert model in cards and cards[model]["kind"] == "chat"
