"""deploy/kubernetes/, checked with no cluster and no network.

A manifest nobody applies in CI rots silently: a misspelled field is pruned
or refused only on a real cluster, a renamed option is passed on to Celery,
and a ScaledObject whose query names a metric nobody exports never scales
anything (Prometheus answers an empty vector, KEDA reads 0). So every
manifest is validated against Kubernetes' own schemas (kubernetes-validate,
strict) and the ScaledObject against KEDA's own CRD (vendored in
tests/data/), every command is parsed by the project's own CLI definitions
(as tests/test_compose.py does for the compose file) and held to compose's
command for the same role, and every name the manifests share with the code
(settings, metrics, routes) is looked up in the code.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from tests.test_compose import celery_worker_command, env_example, expand, raw_compose
from tests.test_compose import commands as compose_commands

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
SENTINEL = DEPLOY / "sentinel" / "kustomization.yaml"
KEDA_CRD = ROOT / "tests" / "data" / "keda.sh_scaledobjects.yaml"
# The oldest Kubernetes that KEDA v2.20 (the vendored CRD) is tested on: a
# field newer than this would break clusters KEDA still supports.
K8S_VERSION = "1.33"
KEDA_API = "keda.sh/v1alpha1"

# Each manifest workload that plays a compose service's role, with the same command.
COMPOSE_ROLES = {"redis": "redis", "llmq-api": "api", "llmq-flower": "flower",
                 "llmq-worker-smollm2-135m-instruct": "worker"}

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def kustomization() -> Doc:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def load_docs() -> list[Doc]:
    """Every object of every file kustomization.yaml lists, in order."""
    return [doc for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


DOCS = load_docs()
CORE = [d for d in DOCS if d["apiVersion"] != KEDA_API]


def doc_id(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in DOCS if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(kind: str, name: str) -> Doc:
    (doc,) = find(kind, name)
    return doc


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def containers(doc: Doc) -> list[Doc]:
    return pod_spec(doc)["containers"] if "template" in doc.get("spec", {}) else []


def argv(container: Doc) -> list[str]:
    # command replaces the image's entrypoint and args its CMD; together, the argv.
    return [*container.get("command", []), *container.get("args", [])]


def secret_data() -> dict[str, str]:
    (secret,) = find("Secret")
    return secret["stringData"]


def container_env(container: Doc) -> dict[str, str]:
    """The container's environment with the Secret template's values filled in."""
    (secret,) = find("Secret")
    out = {}
    for var in container.get("env", []):
        if "value" in var:
            out[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], var
            assert ref["key"] in secret["stringData"], f"{var['name']}: no key {ref['key']} in the Secret"
            out[var["name"]] = secret["stringData"][ref["key"]]
    return out


def k8s_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args ($$ is a literal $);
    an unknown $(VAR) stays as written, as Kubernetes leaves it."""
    return re.sub(r"\$\$|\$\(([A-Za-z_]\w*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


def run_argv(container: Doc) -> list[str]:
    env = container_env(container)
    return [k8s_expand(a, env) for a in argv(container)]


def llmq_containers() -> list[tuple[str, Doc]]:
    return [(doc_id(d), c) for d in DOCS for c in containers(d) if argv(c)[:1] == ["llmq"]]


def parse_llmq(args: list[str]) -> click.Context:
    """`llmq SUB ...` parsed by the CLI itself: an unknown option or a bad
    value raises (test_compose's approach)."""
    from cli.main import app

    root = typer.main.get_command(app)
    assert args[0] == "llmq" and args[1] in root.commands, args  # type: ignore[attr-defined]
    return root.commands[args[1]].make_context(args[1], args[2:])  # type: ignore[attr-defined]


def workers() -> list[tuple[Doc, click.Context]]:
    """Each Deployment that runs `llmq worker`, with its parsed command."""
    return [(d, parse_llmq(argv(c))) for d in find("Deployment") for c in containers(d)
            if argv(c)[:2] == ["llmq", "worker"]]


def settings_from(env: dict[str, str]) -> Any:
    """broker.settings.Settings as the process would build it from this
    environment (and nothing of the test runner's)."""
    from broker.settings import Settings

    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("LLMQ_")]:
            mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        return Settings()


def sentinel_component() -> Doc:
    return yaml.safe_load(SENTINEL.read_text())


def sentinel_patches() -> Iterator[tuple[Doc, list[Doc]]]:
    """The component's JSON6902 patches: (target, operations)."""
    for patch in sentinel_component()["patches"]:
        ops = yaml.safe_load(patch["patch"])
        if isinstance(ops, list):
            yield patch["target"], ops


def added_env(ops: list[Doc]) -> dict[str, str]:
    """The variables a patch appends to a container's env."""
    return {op["value"]["name"]: op["value"]["value"] for op in ops if op["path"].endswith("/env/-")}


# ------------------------------------------------------- the set of files


def test_kustomization_lists_every_manifest() -> None:
    """A file left out of kustomization.yaml is never applied."""
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert len({doc_id(d) for d in DOCS}) == len(DOCS), "an object is defined twice"
    assert sentinel_component()["kind"] == "Component"
    assert "sentinel" in (DEPLOY / "kustomization.yaml").read_text()  # where to turn it on


# ------------------------------------------------------------- schemas


@pytest.mark.parametrize("doc", CORE, ids=doc_id)
def test_core_manifests_validate_against_kubernetes_schemas(doc: Doc) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_is_strict() -> None:
    """A misspelled field fails here, as kubectl's strict field validation
    would fail it, rather than being dropped on the floor."""
    doc = copy.deepcopy(one("Deployment", "llmq-api"))
    containers(doc)[0]["enviroment"] = containers(doc)[0].pop("env")
    with pytest.raises(kubernetes_validate.ValidationError, match="enviroment"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def strict_schema(node: Any) -> Any:
    """The CRD's structural schema, closed: an object with declared
    properties takes no others (the API server prunes or, with kubectl's
    strict field validation, refuses them), unless the schema says it keeps
    unknown fields."""
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def keda_schema() -> Doc:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    group, version = KEDA_API.split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return strict_schema(served["schema"]["openAPIV3Schema"])


def scaled_objects() -> list[Doc]:
    return [d for d in DOCS if d["apiVersion"] == KEDA_API]


def test_scaledobject_validates_against_kedas_crd(keda_schema: Doc) -> None:
    assert [d["kind"] for d in scaled_objects()] == ["ScaledObject"] * len(workers())
    for doc in scaled_objects():
        jsonschema.validate(doc, keda_schema)
        # Kubernetes checks metadata itself, not the CRD: a name a DNS label.
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("change", [
    lambda so: so["spec"].__setitem__("cooldownPeriods", 900),  # misspelled: KEDA would ignore it
    lambda so: so["spec"].__setitem__("minReplicaCount", "0"),  # a string for an int
    lambda so: so["spec"]["triggers"][0]["metadata"].__setitem__("threshold", 32),  # metadata is strings only
])
def test_keda_validation_catches_mistakes(keda_schema: Doc, change: Any) -> None:
    so = copy.deepcopy(scaled_objects()[0])
    change(so)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, keda_schema)


# ----------------------------------------------------- the ScaledObject


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def promql_selectors(query: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """The metric selectors of a PromQL query: (metric name, {label: (op, value)}).
    Enough PromQL for autoscaling queries: functions, aggregations, grouping,
    ranges, offsets and binary operators."""
    q = _GROUPING.sub(" ", query)
    q = re.sub(r"\[[^\]]*\]|\boffset\s+\w+", " ", q)
    out = []
    for m in _SELECTOR.finditer(q):
        name, labels, call = m.groups()
        if call or name in _KEYWORDS:  # a function or aggregation, or a keyword
            continue
        out.append((name, {k: (op, v) for k, op, v in _MATCHER.findall(labels or "")}))
    return out


def test_promql_selectors() -> None:
    q = 'sum by (model) (rate(a:b_total{model="m", x!~"y.*"}[5m] offset 1m)) / on (model) c > bool 0'
    assert promql_selectors(q) == [("a:b_total", {"model": ("=", "m"), "x": ("!~", "y.*")}), ("c", {})]


# How prometheus_client names a family's samples in the exposition.
_SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum",
                    "_created"), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
                    "stateset": ("",), "enum": ("",), "unknown": ("",),
                    "gaugehistogram": ("_bucket", "_gcount", "_gsum")}


def test_scaledobject_scales_a_worker_deployment_from_zero() -> None:
    targets = {}
    for so in scaled_objects():
        ref, spec = so["spec"]["scaleTargetRef"], so["spec"]
        assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment")) == ("apps/v1", "Deployment")
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
        targets[ref["name"]] = so
    # one ScaledObject per worker Deployment, each starting at zero (KEDA owns the count)
    assert set(targets) == {d["metadata"]["name"] for d, _ in workers()}
    for deployment, _ in workers():
        assert deployment["spec"]["replicas"] == 0


def test_scaledobject_query_reads_metrics_the_api_exports() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from api.metrics import Metrics

    metrics = Metrics()
    families = {f.name: f for f in metrics.registry.collect()}
    family_of = {name + suffix: name for name, f in families.items() for suffix in _SAMPLE_SUFFIXES[f.type]}
    wrappers = {next(iter(w.describe())).name: w for w in vars(metrics).values() if isinstance(w, MetricWrapperBase)}
    for deployment, ctx in workers():
        (so,) = [s for s in scaled_objects() if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert {"serverAddress", "query", "threshold"} <= set(meta)
        # Every API replica exports the same gauge: max, since sum counts each job once per replica.
        assert re.match(r"\s*max\s*\(", meta["query"]), meta["query"]
        selectors = promql_selectors(meta["query"])
        assert selectors
        for name, labels in selectors:
            assert name in family_of, f"{name} is not a metric api.metrics exports"
            # The model label is the worker's served name, matched exactly.
            assert labels.get("model") == ("=", ctx.params["model_name"][0]), (name, labels)
            # ...and the metric has that label: labels() raises on label names it
            # lacks, else makes the labelled series, which the registry then shows.
            wanted = {k: v for k, (_, v) in labels.items()}
            wrappers[family_of[name]].labels(**wanted)
            samples = [s for f in metrics.registry.collect() for s in f.samples if s.name == name]
            assert any(wanted.items() <= s.labels.items() for s in samples), name
        # Jobs per worker: what one worker runs at once.
        assert float(meta["threshold"]) == ctx.params["concurrency"]
        # One waiting job (a value above 0) wakes the Deployment from zero.
        assert float(meta.get("activationThreshold", "0")) == 0


def test_cooldown_outlasts_a_job() -> None:
    """KEDA scales the last worker away cooldownPeriod after the last
    outstanding job; a job may wait first_event_timeout_s before it starts."""
    api = containers(one("Deployment", "llmq-api"))[0]
    settings = settings_from(container_env(api))
    for so in scaled_objects():
        assert so["spec"]["cooldownPeriod"] > settings.first_event_timeout_s


# --------------------------------------------------------------- workers


def test_worker_outlives_its_drain() -> None:
    """Kubernetes SIGKILLs a pod terminationGracePeriodSeconds after SIGTERM;
    Celery's warm shutdown needs drain_timeout_s to let running jobs finish."""
    for deployment, _ in workers():
        (container,) = containers(deployment)
        settings = settings_from(container_env(container))
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > settings.drain_timeout_s


def test_worker_has_a_gpu_and_reads_models_from_the_volume() -> None:
    claims = {d["metadata"]["name"] for d in find("PersistentVolumeClaim")}
    for deployment, ctx in workers():
        spec = pod_spec(deployment)
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": "llmq-models", "readOnly": True}
        assert "llmq-models" in claims
        assert all(p.startswith("/models/") for p in ctx.params["model_path"])
        assert "--device" in ctx.args and ctx.args[ctx.args.index("--device") + 1] == "cuda"


def test_demo_model_job_builds_what_the_worker_serves() -> None:
    from cli.demo_model import DEMO_MODEL_NAME

    (job,) = find("Job")
    (container,) = containers(job)
    target = str(parse_llmq(argv(container)).params["target"])
    served = {p: ctx.params["model_name"][0] for _, ctx in workers() for p in ctx.params["model_path"]}
    assert served[target] == DEMO_MODEL_NAME
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "llmq-models" and not mount.get("readOnly")
    assert Path(target).parent == Path(mount["mountPath"])


def test_every_worker_model_is_declared_to_the_api() -> None:
    """A model absent from LLMQ_MODELS is refused (503) while its workers are
    at zero, so no job ever waits and KEDA never wakes them."""
    env = container_env(containers(one("Deployment", "llmq-api"))[0])
    declared = json.loads(env["LLMQ_MODELS"])
    assert all(set(m) == {"name", "kind", "context_length"} for m in declared), declared
    names = {m["name"] for m in declared}
    for _, ctx in workers():
        assert set(ctx.params["model_name"]) <= names
    assert float(env["LLMQ_WAIT_FOR_WORKER_S"]) > 0  # 0 would refuse at once, as for an undeclared model


# ----------------------------------------------------------------- API


def test_api_readiness_probe_is_a_get_route_on_the_api_port() -> None:
    from api.app import create_app

    paths = create_app().openapi()["paths"]
    deployment = one("Deployment", "llmq-api")
    (container,) = containers(deployment)
    port = parse_llmq(argv(container)).params["port"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    # /ready waits for a live worker: with every model at zero, no replica would be ready.
    assert probe["path"] == "/health"
    assert "get" in paths.get(probe["path"], {}), probe["path"]
    assert ports.get(probe["port"], probe["port"]) == port
    # Prometheus' scrape annotations name the same port and a real /metrics route.
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(notes["prometheus.io/port"]) == port and "get" in paths.get(notes["prometheus.io/path"], {})


def test_services_reach_their_pods() -> None:
    workloads = find("Deployment") + find("StatefulSet")
    for svc in find("Service"):
        (target,) = [w for w in workloads
                     if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert target["spec"]["selector"]["matchLabels"].items() <= \
            target["spec"]["template"]["metadata"]["labels"].items()
        ports = {(p.get("name"), p["containerPort"]) for c in containers(target) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert any(port["targetPort"] in pair for pair in ports), (doc_id(svc), port)


# ------------------------------------------------- commands and settings


def test_llmq_commands_parse_with_the_cli() -> None:
    """Every `llmq` command parses, and `llmq worker`'s whole `celery worker`
    command line parses with Celery's options plus llmq's (test_compose's way)."""
    from celery import Celery
    from celery.bin.celery import celery

    from broker.settings import Settings
    from cli.argv import worker_argv

    seen = set()
    for where, container in llmq_containers():
        args = run_argv(container)
        ctx = parse_llmq(args)
        seen.add(args[1])
        if args[1] != "worker":
            assert not ctx.args, (where, ctx.args)
            continue
        full = worker_argv(ctx.params["model_path"], ctx.params["model_name"], ctx.params["concurrency"],
                           list(ctx.args), ctx.params["engine"], settings=Settings())
        i = full.index("worker")
        assert celery.make_context("celery", full[3:i]).params["app"] == "worker.app"
        obj = types.SimpleNamespace(app=Celery(set_as_current=False))
        params = celery_worker_command().make_context("worker", full[i + 1:], obj=obj).params
        assert params["max_batch_size"] == params["concurrency"] == ctx.params["concurrency"], where
    assert seen == {"api", "worker", "demo-model"}


def check_flower(args: list[str]) -> click.Context:
    """celery [global options] flower [flower options]: Flower drops an option
    it does not know, so each must be one of its own."""
    from celery.bin.celery import celery
    from flower.command import is_flower_option

    assert args[0] == "celery" and "flower" in celery.commands
    i = args.index("flower")
    for opt in args[i + 1:]:
        assert opt.startswith("--") and is_flower_option(opt), opt
    return celery.make_context("celery", args[1:i])


def test_flower_command_and_login() -> None:
    (container,) = containers(one("Deployment", "llmq-flower"))
    args = run_argv(container)
    broker = check_flower(args).params["broker"]
    assert urlsplit(broker).hostname == one("Service", "redis")["metadata"]["name"]
    data = secret_data()
    assert [a for a in args if a.startswith("--basic-auth=")] == \
        [f"--basic-auth={data['FLOWER_USER']}:{data['FLOWER_PASSWORD']}"]


def test_commands_are_composes_for_the_same_role() -> None:
    """With compose's variables set to the Secret's values, each workload runs
    exactly the command compose runs for that role, image included."""
    data = secret_data()
    env = env_example() | {k: data[k] for k in ("REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD")}
    services = expand(raw_compose(), env)["services"]
    for name, role in COMPOSE_ROLES.items():
        (workload,) = [d for d in find("Deployment") + find("StatefulSet") if d["metadata"]["name"] == name]
        (container,) = containers(workload)
        args = run_argv(container)
        assert not any("$(" in a for a in args), (name, args)  # every $(VAR) is in its env
        assert args == compose_commands(services[role])[0], name
        assert container["image"] == services[role]["image"], name


def test_secret_is_a_template_and_agrees_with_itself() -> None:
    data = secret_data()
    for key in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "LLMQ_REDIS_URL"):
        assert "REPLACE-ME" in data[key], key  # a placeholder, marked as one
    url = urlsplit(data["LLMQ_REDIS_URL"])
    redis = one("Service", "redis")
    assert url.password == data["REDIS_PASSWORD"]
    assert (url.hostname, url.port) == (redis["metadata"]["name"], redis["spec"]["ports"][0]["port"])


def test_llmq_environment_variables_are_settings() -> None:
    """pydantic-settings ignores a misspelled LLMQ_ variable; here each must be
    a field, and each value must parse as the process would parse it."""
    from broker.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    envs = [(doc_id(d), container_env(c)) for d in DOCS for c in containers(d)]
    envs += [(f"sentinel component: {target}", added_env(ops)) for target, ops in sentinel_patches()]
    unknown = sorted({var for _, env in envs for var in env
                      if var.startswith(prefix) and var.removeprefix(prefix).lower() not in Settings.model_fields})
    assert not unknown, f"not fields of broker.settings.Settings: {unknown}"
    for where, env in envs:
        settings = settings_from(env)
        for var in env:
            if var.startswith(prefix):
                assert getattr(settings, var.removeprefix(prefix).lower()) not in (None, [], ""), (where, var)


# ------------------------------------------------------------- Sentinel


def test_sentinel_component_switches_every_llmq_process() -> None:
    """Turned on, every llmq Deployment reaches Redis through the Sentinels,
    Flower through llmq's own Celery app (which follows them; `--broker URL`
    would not)."""
    from broker.connections import celery_broker

    patches = list(sentinel_patches())
    (everyone,) = [ops for target, ops in patches if "labelSelector" in target]
    labelled = {d["metadata"]["name"] for d in find("Deployment")
                if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/part-of") == "llmq"}
    assert labelled == {d["metadata"]["name"] for d in find("Deployment")}
    (flower_container,) = containers(one("Deployment", "llmq-flower"))
    settings = settings_from(container_env(flower_container) | added_env(everyone))
    assert celery_broker(settings)[0].startswith("sentinel://")
    (flower,) = [ops for target, ops in patches if target.get("name") == "llmq-flower"]
    (op,) = flower
    assert (op["op"], op["path"]) == ("replace", "/spec/template/spec/containers/0/args")
    args = [k8s_expand(a, container_env(flower_container)) for a in op["value"]]
    assert check_flower(args).params["app"] == "broker.app"
    assert [a for a in args if a.startswith("--basic-auth=")]
    deleted = [yaml.safe_load(p["patch"]) for p in sentinel_component()["patches"] if "target" not in p]
    assert {(d["kind"], d["metadata"]["name"]) for d in deleted} == {("StatefulSet", "redis"), ("Service", "redis")}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("sentinel", [False, True], ids=["default", "sentinel"])
def test_kustomize_builds_valid_objects(tmp_path: Path, sentinel: bool, keda_schema: Doc) -> None:
    """What `kubectl apply -k` would send, built offline: patches applied, the
    namespace set, and each object still valid."""
    root = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, root)
    if sentinel:
        with (root / "kustomization.yaml").open("a") as f:
            f.write("components:\n  - sentinel\n")
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(DOCS) - (2 if sentinel else 0)
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"], doc_id(doc)
        if doc["apiVersion"] == KEDA_API:
            jsonschema.validate(doc, keda_schema)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert any(d["metadata"]["name"] == "redis" for d in built) is not sentinel
