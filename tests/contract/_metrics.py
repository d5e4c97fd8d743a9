"""What each service really exports, and the queries the operator's files run: shared by the contract tests, the
live Prometheus test (tests/integration/test_prometheus.py) and bench/hpa_metrics.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from services.cli.mesh import LocalMesh

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "ragfleet.json"
SERVICES = ("embedding", "retrieval", "generation", "gateway")
# Series only kube-state-metrics exports: the queries naming them cannot run against a mesh without a cluster.
KUBE_STATE_METRICS = re.compile(r"\bkube_[a-z_]+")

_REGISTRY_DUMP = """
import importlib, json, sys
importlib.import_module(f"services.{sys.argv[1]}.server")  # everything the service process registers
from prometheus_client import REGISTRY
out = {}
for sample, collector in REGISTRY._names_to_collectors.items():
    out[sample] = {"family": getattr(collector, "_name", sample), "type": getattr(collector, "_type", "unknown"),
                   "labels": list(getattr(collector, "_labelnames", ()))}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Exported:
    """One sample name a service exposes: its metric family, type and label names."""

    family: str
    type: str
    labels: tuple[str, ...]


@cache
def exported(service: str) -> dict[str, Exported]:
    """Sample names (`x_total`, `x_bucket`, ...) the service's process registers with prometheus_client, read from
    a fresh interpreter that imports the service exactly as `python -m services.<name>` does."""
    result = subprocess.run([sys.executable, "-c", _REGISTRY_DUMP, service], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    raw = json.loads(result.stdout)
    return {name: Exported(v["family"], v["type"], tuple(v["labels"])) for name, v in raw.items()}


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def hpas() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "HorizontalPodAutoscaler"}


def adapter_rules() -> list[dict[str, Any]]:
    (config_map,) = [d for d in manifests() if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == "ragfleet-prometheus-adapter"]
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def series_name(series_query: str) -> str:
    match = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", series_query)
    assert match, series_query
    return match.group(1)


def label_matchers(selector: str) -> dict[str, str]:
    """label -> value of the equality matchers in a selector's braces."""
    inside = selector[selector.index("{") + 1:selector.rindex("}")] if "{" in selector else ""
    return dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"([^"]*)"', inside))


def rule_metric_name(rule: dict[str, Any]) -> str | None:
    """The custom metric name the adapter derives from a rule's series (name.matches -> name.as), or None."""
    series = series_name(rule["seriesQuery"])
    matches = rule.get("name", {}).get("matches", "^(.*)$")
    if not re.search(matches, series):
        return None
    as_ = rule.get("name", {}).get("as", "$1")
    return re.sub(matches, re.sub(r"\$\{?(\d+)\}?", r"\\\1", as_), series)


def render_adapter_query(rule: dict[str, Any], namespace: str, pods: list[str]) -> str:
    """The PromQL the adapter sends for a pods metric over `pods` (its Go template, filled the same way)."""
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series_name(rule["seriesQuery"]))
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))


def hpa_pod_metrics() -> list[tuple[str, str]]:
    """(service, custom metric name) for every Pods metric an HPA names."""
    return [(name, m["pods"]["metric"]["name"]) for name, hpa in sorted(hpas().items())
            for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]


def pod_targets(mesh: LocalMesh, namespace: str) -> list[dict[str, Any]]:
    """What Kubernetes pod discovery yields for one pod per service of a local mesh: a target per declared
    container port, with the Deployment's pod labels and annotations, except that the ports are the local
    processes'."""
    targets = []
    for doc in manifests():
        name = doc["metadata"]["name"]
        if doc["kind"] != "Deployment" or name not in SERVICES:
            continue
        template = doc["spec"]["template"]
        meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": f"{name}-0"}
        for key, value in template["metadata"]["labels"].items():
            meta["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
        for key, value in template["metadata"]["annotations"].items():
            meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
        meta["__meta_kubernetes_pod_annotation_prometheus_io_port"] = str(mesh.metrics_ports[name])
        local = {"grpc": mesh.ports[name], "metrics": mesh.metrics_ports[name]}
        for port in template["spec"]["containers"][0]["ports"]:
            targets.append({"targets": [f"127.0.0.1:{local[port['name']]}"],
                            "labels": {**meta, "__meta_kubernetes_pod_container_port_name": port["name"]}})
    return targets


def scrape_config(mesh: LocalMesh, namespace: str) -> dict[str, Any]:
    """The shipped prometheus.yml scraping a local mesh: the pod discovery swapped for static targets carrying the
    labels a pod would have (so the shipped relabelling runs unchanged), 1 s intervals, rule files by full path."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / pattern) for pattern in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ragfleet-pods"]
    assert "kubernetes_sd_configs" in job
    del job["kubernetes_sd_configs"]
    job["static_configs"] = pod_targets(mesh, namespace)
    return config


def rule_groups() -> list[dict[str, Any]]:
    groups = []
    for path in sorted((PROMETHEUS / "rules").glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def recordings() -> dict[str, dict[str, Any]]:
    return {r["record"]: r for g in rule_groups() for r in g["rules"] if "record" in r}


_COMPARISON = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*[-+0-9.e]+\s*$")


def alert_signal(expr: str) -> str:
    """An alert's expression without its final threshold: the series it watches, which must have data in a healthy
    mesh (a comparison that holds nothing is how a healthy mesh looks)."""
    return _COMPARISON.sub("", expr.strip())


def dashboard_panels() -> list[dict[str, Any]]:
    board = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])  # collapsed rows keep theirs inside
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query in the dashboard, Grafana variables filled for one namespace."""
    out = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$namespace", "ragfleet").replace("$__rate_interval", "1m")
            out.append((panel["title"], expr))
    return out
