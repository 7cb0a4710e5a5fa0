"""The engine registry (``worker/engines/registry.py``): listing the engines
and their options loads no engine library, each engine reads its own
options, and two engines cannot take one name or one option."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from tests.procs import ROOT
from worker.engines import registry
from worker.engines.registry import EngineKind, EngineOptions, kind_of, kinds, register


def test_listing_the_engines_and_their_options_imports_no_engine_library() -> None:
    code = ("import sys; from worker.engines.registry import kinds; import worker.bootstep; "
            "print(sorted(kinds())); "
            "print([m for m in ('torch', 'vllm', 'xgrammar', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["['llama.cpp', 'synthetic', 'transformers', 'vllm']", "[]"], out.stderr


def test_each_engine_reads_its_own_options() -> None:
    opts = {"engine": "vllm", "max_batch_size": 8, "max_step_tokens": 64, "tensor_parallel_size": 2,
            "llama_server": "/bin/llama-server", "prefix_caching": False}
    vllm = kind_of("vllm").options_type.read(opts)
    assert (vllm.engine, vllm.max_batch_size, vllm.tensor_parallel_size, vllm.prefix_caching) == ("vllm", 8, 2, False)
    assert not hasattr(vllm, "max_step_tokens") and not hasattr(vllm, "llama_server")
    transformers = kind_of("transformers").options_type.read({**opts, "engine": "transformers"})
    assert transformers.max_step_tokens == 64 and not hasattr(transformers, "tensor_parallel_size")
    llama = kind_of("llama.cpp").options_type.read({**opts, "engine": "llama.cpp"})
    assert llama.llama_server == "/bin/llama-server" and not hasattr(llama, "max_step_tokens")


def test_llama_server_comes_from_its_option_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    (option,) = [o for o in kind_of("llama.cpp").options if o.name == "llama_server"]
    command = click.Command("w", params=[option], callback=lambda **kw: kw)
    monkeypatch.delenv("LLMQ_LLAMA_SERVER", raising=False)
    assert command.main([], standalone_mode=False) == {"llama_server": None}
    monkeypatch.setenv("LLMQ_LLAMA_SERVER", "/opt/llama-server")
    assert command.main([], standalone_mode=False) == {"llama_server": "/opt/llama-server"}
    assert command.main(["--llama-server", "/x"], standalone_mode=False) == {"llama_server": "/x"}


def test_two_engines_cannot_share_a_name_or_an_option(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds()  # the built-ins are in
    monkeypatch.setattr(registry, "_kinds", dict(registry._kinds))
    with pytest.raises(ValueError, match="two engines are named"):
        register(EngineKind(name="vllm", engine="x:Y"))
    clash = click.Option(["--max-step-tokens"], type=int)
    with pytest.raises(ValueError, match="another engine's"):
        register(EngineKind(name="other", engine="x:Y", options=[clash]))
    register(EngineKind(name="plain", engine="x:Y"))
    assert kind_of("plain").options_type is EngineOptions
    with pytest.raises(KeyError, match="no engine 'nope'"):
        kind_of("nope")
