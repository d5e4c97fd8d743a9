"""Autoscaling contract: every custom metric an HPA names is produced by exactly one Prometheus Adapter rule, from
a series (and labels) the HPA's own service really registers, on the labels the shipped scrape job attaches. Whether
those queries return data from a live mesh is tests/integration/test_prometheus.py's job."""

from __future__ import annotations

import re

import pytest
import yaml

from services.runtime.pb.ragfleet.v1 import embedding_pb2, gateway_pb2, generation_pb2, retrieval_pb2

from ._metrics import (PROMETHEUS, SERVICES, adapter_rules, exported, hpa_pod_metrics, hpas, label_matchers,
                       rule_metric_name, series_name)

PROTO = {"embedding": embedding_pb2, "retrieval": retrieval_pb2, "generation": generation_pb2, "gateway": gateway_pb2}
# Labels every scraped series carries from the scrape job's relabelling (deploy/prometheus/prometheus.yml).
SCRAPE_LABELS = {"namespace", "pod", "service", "job", "instance"}
METRIC_NAME = re.compile(r"\b(ragfleet_[a-z0-9_]+)\b")


def _rule_for(metric: str) -> dict:
    producing = [r for r in adapter_rules() if rule_metric_name(r) == metric]
    assert len(producing) == 1, f"{metric}: {len(producing)} adapter rules produce it (need exactly one)"
    return producing[0]


def test_every_service_scales_on_cpu_and_its_own_saturation_signal() -> None:
    assert sorted(hpas()) == sorted(SERVICES)
    by_service = {}
    for service, metric in hpa_pod_metrics():
        by_service.setdefault(service, []).append(metric)
    assert by_service == {
        "gateway": ["ragfleet_gateway_asks_in_flight_1m"],
        "generation": ["ragfleet_generation_stream_saturation"],
        "embedding": ["ragfleet_embedding_queue_depth_1m", "ragfleet_embedding_queue_wait_seconds_mean_1m"],
        "retrieval": ["ragfleet_retrieval_searches_in_flight_1m"],
    }
    for name, hpa in hpas().items():
        kinds = sorted(m["type"] for m in hpa["spec"]["metrics"])
        assert kinds.count("Resource") == 1, name
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Pods":
                assert m["pods"]["target"]["type"] == "AverageValue", f"{name}: a per-pod target"


@pytest.mark.parametrize("name", SERVICES)
def test_scale_up_is_fast_and_scale_down_is_stabilised(name: str) -> None:
    behavior = hpas()[name]["spec"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0, "scale up on the latest recommendation"
    assert up.get("selectPolicy", "Max") == "Max"
    # At least doubling (or +4 pods) within 15 s.
    assert any((p["type"] == "Percent" and p["value"] >= 100 or p["type"] == "Pods" and p["value"] >= 4)
               and p["periodSeconds"] <= 15 for p in up["policies"]), up
    assert down["stabilizationWindowSeconds"] >= 300, "scale down on the highest recommendation of 5 minutes"
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), "one pod at a time: each drains"


@pytest.mark.parametrize(("service", "metric"), hpa_pod_metrics(), ids=lambda v: v)
def test_each_hpa_metric_comes_from_a_rule_over_a_series_its_service_exports(service: str, metric: str) -> None:
    rule = _rule_for(metric)
    series = series_name(rule["seriesQuery"])
    names = exported(service)
    assert series in names, f"{metric}: the rule reads {series}, which {service} does not export"
    # Every other series its query reads is exported by the same service (e.g. the admission limit).
    for other in set(METRIC_NAME.findall(rule["metricsQuery"])):
        assert other in names, f"{metric}: the query reads {other}, which {service} does not export"
    # Label matchers name labels the series has: its own, or those the scrape job adds.
    matchers = label_matchers(rule["seriesQuery"])
    assert {"namespace", "pod"} <= set(re.findall(r"(\w+)!=", rule["seriesQuery"])) | set(matchers)
    for label, value in matchers.items():
        assert label in set(names[series].labels) | SCRAPE_LABELS, f"{metric}: {series} has no label {label}"
        if label == "method":  # an RPC of this very service
            package, rpc = value.lstrip("/").rsplit("/", 1)
            proto_service = package.rsplit(".", 1)[1]
            assert proto_service in PROTO[service].DESCRIPTOR.services_by_name, value
            assert rpc in PROTO[service].DESCRIPTOR.services_by_name[proto_service].methods_by_name, value
            assert f'method="{value}"' in rule["metricsQuery"], "the query must filter the same method"
    # The adapter maps those labels to the pod and namespace resources, and the query is per pod.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"], f"{metric}: the query ignores {placeholder}"


def test_every_adapter_rule_serves_an_hpa() -> None:
    named = {metric for _, metric in hpa_pod_metrics()}
    assert {rule_metric_name(r) for r in adapter_rules()} == named


def test_the_scrape_job_attaches_the_labels_the_adapter_and_rules_group_by() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ragfleet-pods"]
    targets = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert targets["service"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]


def test_a_misnamed_series_would_fail_this_contract() -> None:
    """The check has teeth: a rule over a series nobody exports is caught."""
    assert "ragfleet_gateway_asks_in_flight" in exported("gateway")
    assert "ragfleet_gateway_asks_inflight" not in exported("gateway")
    assert "ragfleet_generation_active_streams" not in exported("gateway")
