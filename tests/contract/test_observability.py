"""The operator's files check out with their own tools and agree with each other: promtool checks and unit-tests the
rules (every alert has a firing case), the scrape config loads, the dashboard is well formed and reads only
recorded or exported series, and the collector keeps error and slow traces through a consistent pipeline.
promtool comes with Debian's `prometheus` package, which .ci/run installs when absent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ._metrics import (DASHBOARD, K8S, PROMETHEUS, SERVICES, alerts, dashboard_panels, dashboard_queries, exported,
                       manifests, recordings)

RULE_TESTS = PROMETHEUS / "tests" / "ragfleet_test.yml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: .ci/run installs Debian's `prometheus` package (which ships it) when "
                    "absent; locally run `apt-get install -y prometheus`")
    return found


def _run(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules() -> None:
    result = _run(_promtool(), "check", "rules", *sorted(str(p) for p in (PROMETHEUS / "rules").glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    """Everything but the discovery: Debian builds Prometheus without Kubernetes service discovery, so the job's
    kubernetes_sd_configs is swapped for a static target here (as the live test does), relabelling unchanged."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS / pattern) for pattern in config["rule_files"]]
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["ragfleet"]}}]
    job["static_configs"] = [{"targets": ["127.0.0.1:9450"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = _run(_promtool(), "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = _run(_promtool(), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert firing == set(alerts()), f"alerts without a firing test: {set(alerts()) - firing}"
    for name, rule in alerts().items():
        assert rule.get("for"), f"{name}: alerts on one bad evaluation"
        assert rule["labels"]["severity"] in ("page", "critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_unit_tests_have_teeth(tmp_path: Path) -> None:
    """A changed threshold fails them: the same command on a copy whose error-ratio alert fires only above 50 %."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    rules = (PROMETHEUS / "rules" / "ragfleet.yml").read_text()
    assert rules.count("ratio_rate5m > 0.05") == 1
    (tmp_path / "rules" / "ragfleet.yml").write_text(rules.replace("ratio_rate5m > 0.05", "ratio_rate5m > 0.5"))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    result = _run(_promtool(), "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name), cwd=tmp_path)
    assert result.returncode != 0 and "RagfleetHighErrorRatio" in result.stdout + result.stderr


def test_the_dashboard_has_an_ask_overview_and_a_row_per_service() -> None:
    panels = dashboard_panels()
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Ask overview", *sorted(SERVICES, key=["gateway", "embedding", "retrieval",
                                                           "generation"].index)]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    overview = " ".join(p["title"].lower() for p in panels[1:panels.index(next(
        p for p in panels if p["type"] == "row" and p["title"] == "gateway"))])
    for topic in ("asks per second", "first token", "cache hit", "errors", "replicas"):
        assert topic in overview, f"the Ask overview lacks {topic}"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_read_recorded_or_exported_series_only() -> None:
    known = set(recordings()) | {"up"}
    for service in SERVICES:
        known |= set(exported(service))
    for title, expr in dashboard_queries():
        for name in re.findall(r"\b([a-z_]+:[a-z0-9_:]+|ragfleet_[a-z0-9_]+|process_[a-z0-9_]+)\b", expr):
            assert name in known, f"panel {title!r} reads {name}, which nothing records or exports"


def _collector_config() -> dict:
    (config_map,) = [d for d in manifests() if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"] == "otel-collector-config"]
    return yaml.safe_load(config_map["data"]["config.yaml"])


def test_collector_pipelines_reference_only_defined_components() -> None:
    config = _collector_config()
    for pipeline_name, pipeline in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config.get(kind, {}), f"{pipeline_name}: {kind[:-1]} {component} is not defined"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"], extension
    # memory_limiter first (it must see everything), batch last (after sampling has dropped what it drops).
    processors = config["service"]["pipelines"]["traces"]["processors"]
    assert processors[0] == "memory_limiter" and processors[-1] == "batch" and "tail_sampling" in processors


def test_collector_keeps_every_error_and_slow_trace_and_samples_the_rest() -> None:
    sampling = _collector_config()["processors"]["tail_sampling"]
    policies = {p["type"]: p for p in sampling["policies"]}
    assert set(policies) == {"status_code", "latency", "probabilistic"}, "top-level policies are OR-ed"
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert policies["latency"]["latency"]["threshold_ms"] > 0
    assert 0 < policies["probabilistic"]["probabilistic"]["sampling_percentage"] < 100
    # The root span (the gateway's Ask) ends last: the decision must wait for a default answer stream (~26 s).
    decision_wait = int(sampling["decision_wait"].removesuffix("s"))
    config_map = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    assert decision_wait >= int(config_map["RAGFLEET_GENERATION_GRACE_SECONDS"]) - 15
    (deployment,) = [d for d in manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "otel-collector"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("otel/opentelemetry-collector-contrib:"), "tail_sampling is contrib-only"
    assert deployment["spec"]["replicas"] == 1, "tail sampling needs a trace's spans in one collector"
