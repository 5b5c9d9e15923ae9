"""What on-call gets from deploy/ as it runs: the scrape jobs on Kubernetes give the labels the
alerts select on, the dashboard's deployment-wide numbers are not multiplied by the pod count, and
README's alert table lists every alert."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_deploy_configs import (
    PROM,
    ROOT,
    RUNBOOK,
    alerts,
    dashboard_panels,
    k8s_docs,
    k8s_object,
    load_yaml,
    need_yaml,
    run,
)
from tests.tools import tool

pytestmark = pytest.mark.deploy

PROMETHEUS_K8S = PROM / "prometheus-k8s.yml"


# ------------------------------------------------------------------ scraping on Kubernetes


def _pod_targets(namespace: str = "prod") -> list[dict[str, str]]:
    """What Kubernetes service discovery (role: pod) offers for each container port of the pods
    of deploy/k8s: one target per port, with the pod's labels as meta labels."""
    targets = []
    for _, doc in k8s_docs():
        template = doc.get("spec", {}).get("template") or doc.get("spec", {}).get(
            "jobTemplate", {}
        ).get("spec", {}).get("template")
        if not template:
            continue
        pod_labels = template["metadata"].get("labels", {})
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []) or [{}]:
                meta = {
                    f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                    for k, v in pod_labels.items()
                }
                meta |= {
                    "__address__": f"10.0.0.1:{port.get('containerPort', 80)}",
                    "__meta_kubernetes_namespace": namespace,
                    "__meta_kubernetes_pod_name": f"{doc['metadata']['name']}-0",
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                }
                targets.append(meta)
    return targets


def _relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' keep, drop and replace relabelling (what the configs here use)."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        value = config.get("separator", ";").join(
            labels.get(name, "") for name in config.get("source_labels", [])
        )
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", config.get("replacement", "$1"))
            labels[config["target_label"]] = match.expand(replacement)
        assert action in {"keep", "drop", "replace"}, action
    return labels


def _scraped(job_name: str) -> list[dict[str, str]]:
    config = load_yaml(PROMETHEUS_K8S)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == job_name]
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"], job_name
    kept = []
    for target in _pod_targets():
        labels = _relabel(target, job.get("relabel_configs", []))
        if labels is not None:
            labels.setdefault("job", job_name)
            labels.setdefault("instance", labels["__address__"])
            kept.append({k: v for k, v in labels.items() if not k.startswith("__")})
    return kept


def test_kubernetes_has_a_scrape_config_whose_jobs_the_alerts_select() -> None:
    """prometheus.yml sends Kubernetes users to prometheus-k8s.yml; the Deployment's generic
    prometheus.io annotations alone give job="kubernetes-pods", which MedWalletTargetDown
    (up{job="medwallet-authz"}) and the redis-cluster alerts (job="redis-cluster") never
    select."""
    assert PROMETHEUS_K8S.is_file(), "prometheus.yml names prometheus-k8s.yml; it does not exist"
    config = load_yaml(PROMETHEUS_K8S)
    assert set(config["rule_files"]) == {"recording_rules.yml", "alert_rules.yml"}
    selected_jobs = {
        job for rule in alerts().values() for job in re.findall(r'\bjob="([^"]+)"', rule["expr"])
    }
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert selected_jobs <= jobs, f"alerts select jobs no scrape config has: {selected_jobs - jobs}"


def test_kubernetes_jobs_scrape_exactly_the_metrics_ports_with_a_namespace() -> None:
    server = _scraped("medwallet-authz")
    # one target per server pod: its metrics port (the workers are aggregated there), not the
    # gRPC port, nor the migrate/reconcile Jobs, nor Redis
    assert len(server) == 1, server
    assert server[0]["instance"].endswith(":9464"), server
    assert server[0]["namespace"] == "prod"  # the recording rules aggregate by namespace
    redis = _scraped("redis-cluster")
    assert len(redis) == 1 and redis[0]["instance"] == "redis-cluster-0", redis
    assert redis[0]["namespace"] == "prod"


def test_prometheus_k8s_config_is_valid_yaml_promtool_can_read_where_built_with_k8s_sd(
    tmp_path: Path,
) -> None:
    """Debian's promtool is built without Kubernetes service discovery: check the file with its
    jobs turned into static ones (the rest of the file as it is)."""
    config = load_yaml(PROMETHEUS_K8S)
    for job in config["scrape_configs"]:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["10.0.0.1:9464"]}]
    copy = tmp_path / "prometheus-k8s.yml"
    copy.write_text(need_yaml().safe_dump(config))
    for rules in config["rule_files"]:
        (tmp_path / rules).write_text((PROM / rules).read_text())
    run([tool("promtool"), "check", "config", str(copy)])


# ----------------------------------------------------------------------------- dashboard

# Gauges every server pod reports the same deployment-wide value of: each pod's sweeper (worker 0,
# runtime/serving.py sweep_holds=index == 0) counts every open hold in the one shared Redis.
DEPLOYMENT_WIDE_GAUGES = {"medwallet_open_holds"}


def test_dashboard_does_not_add_up_deployment_wide_gauges_over_pods(tmp_path: Path) -> None:
    """Three pods, each reporting the 120 open holds of the shared Redis: the panel shows 120."""
    cases = [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if any(gauge in target["expr"] for gauge in DEPLOYMENT_WIDE_GAUGES)
    ]
    assert cases, "the dashboard shows no open holds"
    rules, tests = [], []
    for index, expr in enumerate(cases):
        concrete = expr.replace('{job=~"$job", namespace=~"$namespace"}', "")
        assert "$" not in concrete, expr
        rules.append({"record": f"dashboard:panel_{index}:value", "expr": concrete})
        tests.append(
            {
                "expr": f"dashboard:panel_{index}:value",
                "eval_time": "2m",
                "exp_samples": [{"labels": f"dashboard:panel_{index}:value", "value": 120}],
            }
        )
    pod_labels = 'namespace="prod",job="medwallet-authz",instance="10.0.0.{}:9464"'
    series = [
        {"series": f"{gauge}{{{pod_labels.format(pod)}}}", "values": "120x5"}
        for gauge in DEPLOYMENT_WIDE_GAUGES
        for pod in (1, 2, 3)
    ]
    yaml = need_yaml()
    (tmp_path / "panels.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]})
    )
    (tmp_path / "panels_test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["panels.yml"],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
            }
        )
    )
    run([tool("promtool"), "test", "rules", str(tmp_path / "panels_test.yml")])


# ------------------------------------------------------------------------------- README


def test_readme_alert_table_lists_every_alert() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Alerts", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(MedWallet\w+)`", section, flags=re.M))
    defined = set(alerts())
    assert defined - listed == set(), f"alerts missing from README's table: {defined - listed}"
    assert listed - defined == set(), f"README lists alerts that do not exist: {listed - defined}"


# ------------------------------------------------------------------------------ RUNBOOK


def test_runbook_revokes_tokens_where_the_deployment_keeps_them() -> None:
    """deployment.yaml mounts the tokens file from a Secret, read-only, a copy in every pod:
    `medwallet-authz tokens revoke` run in a pod fails there ("Read-only file system": it
    writes a temporary file beside the tokens file), and could only have reached that one pod.
    Every RUNBOOK section that tells on-call to revoke a token must say how through the
    Secret."""
    deployment = k8s_object("Deployment", "medwallet-authz")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = k8s_object("ConfigMap", "medwallet-authz-config")["data"]
    tokens_dir = config["MEDWALLET_TOKENS_FILE"].rsplit("/", 1)[0]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == tokens_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount.get("readOnly") and "secret" in volume  # what makes the plain command fail
    secret = volume["secret"]["secretName"]
    runbook = RUNBOOK.read_text(encoding="utf-8")
    sections = re.split(r"(?m)^## ", runbook)
    revoking = [s for s in sections if "tokens revoke" in s]
    assert revoking, "the RUNBOOK no longer says how to revoke a token"
    for section in revoking:
        title = section.splitlines()[0]
        assert secret in section and "kubectl" in section, (
            f"RUNBOOK {title!r}: `tokens revoke` cannot write the Secret {secret!r} mounted "
            "read-only in every pod; say how to revoke through the Secret"
        )


# ------------------------------------------------------------------- metrics the code exports


def _exported() -> set[str]:
    """Every series name authz_server/observability/metrics.py defines (histograms as their
    _bucket/_sum/_count, counters as _total), as a scrape shows them."""
    from prometheus_client import REGISTRY

    import authz_server.observability.metrics  # noqa: F401  (registers them)

    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith(("grpc_server_", "medwallet_")):
            continue
        if family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count")}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def test_rules_and_dashboard_are_checked_against_what_the_code_exports() -> None:
    """test_deploy_configs checks the rules and the dashboard against KNOWN_METRICS: that list
    must be the code's, else a metric renamed in the code leaves alerts that never fire while
    the check passes (and a new one cannot be alerted on)."""
    from tests.deploy.test_deploy_configs import KNOWN_METRICS, REDIS_EXPORTER_METRICS

    ours = KNOWN_METRICS - REDIS_EXPORTER_METRICS - {"up"}
    exported = _exported()
    assert ours - exported == set(), f"checked against, not exported: {ours - exported}"
    assert exported - ours == set(), f"exported, not checked against: {exported - ours}"
