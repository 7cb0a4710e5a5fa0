"""The processes' entry points build their Settings once, when they start,
and hand them down: the Celery apps that ``celery -A`` loads, ``llmq api
--api-key``, the vLLM worker's Python. No services; the import checks run in
a fresh interpreter, where nothing is imported or cached yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.settings import Settings
from cli.argv import engine_python
from tests.procs import ROOT


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=False)


def test_importing_the_celery_apps_builds_no_settings() -> None:
    # An invalid setting fails only where the app is asked for, as `celery -A` asks.
    done = python("import broker.app, worker.app\n"
                  "print('imported', flush=True)\n"
                  "from celery.app.utils import find_app\n"
                  "find_app('broker.app')", LLMQ_MAX_QUEUE_DEPTH="0")
    assert done.stdout == "imported\n", done.stderr
    assert done.returncode == 1 and "max_queue_depth" in done.stderr, done.stderr


def test_celery_finds_each_app_built_once_from_the_environment() -> None:
    done = python("from celery.app.utils import find_app\n"
                  "worker, flower = find_app('worker.app'), find_app('broker.app')\n"
                  "assert find_app('worker.app') is worker and find_app('broker.app') is flower\n"
                  "assert worker.llmq_settings.heartbeat_ttl_s == 7\n"
                  "assert any(o.name == 'model_path' for o in worker.user_options['worker'])\n"
                  "for app in (worker, flower):\n"
                  "    assert app.conf.broker_transport_options['visibility_timeout'] == 7\n",
                  LLMQ_HEARTBEAT_TTL_S="7")
    assert done.returncode == 0, done.stderr


def test_the_cli_modules_import_each_other_one_way() -> None:
    done = python("import sys, cli.up\nassert 'cli.main' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_api_keys_option_reaches_the_app_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from cli.main import app

    ran: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda target, **kwargs: ran.update(target=target, **kwargs))
    monkeypatch.setenv("LLMQ_API_KEYS", "from-env")
    result = CliRunner().invoke(app, ["api", "--api-key", "k1, k2", "--api-key", "k3"])
    assert result.exit_code == 0, result.output
    assert ran["factory"] is True
    api = ran["target"]()
    assert api.state.settings.api_keys == ["k1", "k2", "k3"]
    assert os.environ["LLMQ_API_KEYS"] == "from-env"  # read, never written


def test_vllm_python_comes_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_python = tmp_path / "python"
    venv_python.touch()
    monkeypatch.setenv("LLMQ_VLLM_PYTHON", str(venv_python))
    assert engine_python("vllm", Settings()) == str(venv_python)
    assert engine_python("transformers", Settings()) == sys.executable
    # A missing one falls back to this Python, as a missing .venv-vllm does.
    assert engine_python("vllm", Settings(vllm_python=tmp_path / "missing")) == sys.executable
