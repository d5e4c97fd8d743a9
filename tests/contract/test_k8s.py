"""Kubernetes manifests (deploy/k8s): parsed and checked for the invariants a cluster would otherwise discover late."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._config_vars import SERVICES, load_all

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROTO_SERVICE = {name: f"ragfleet.v1.{name.capitalize()}Service" for name in SERVICES}
UPSTREAMS = ("embedding", "retrieval", "generation")


def _load() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            doc["_file"] = path.name
            objects[key] = doc
    return objects


OBJECTS = _load()
CONFIG = OBJECTS[("ConfigMap", "ragfleet-config")]["data"]


def _container(kind: str, name: str) -> dict[str, Any]:
    (container,) = OBJECTS[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return container


def _port(container: dict[str, Any], port_name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port_name)


def test_every_object_is_namespaced_and_labelled() -> None:
    for (kind, name), doc in OBJECTS.items():
        assert doc["apiVersion"] and doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ragfleet", name
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "ragfleet", f"{kind}/{name}"


def test_kustomization_lists_exactly_the_manifest_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == "ragfleet"
    assert [image["name"] for image in kustomization["images"]] == ["ragfleet"]


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_deployment_service_and_hpa(name: str) -> None:
    deployment = OBJECTS[("Deployment", name)]
    service = OBJECTS[("Service", name)]
    hpa = OBJECTS[("HorizontalPodAutoscaler", name)]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("name", SERVICES)
def test_ports_probes_and_config_agree(name: str) -> None:
    prefix = f"RAGFLEET_{name.upper()}_"
    container = _container("Deployment", name)
    grpc_port, metrics_port = _port(container, "grpc"), _port(container, "metrics")
    assert int(CONFIG[prefix + "PORT"]) == grpc_port
    assert int(CONFIG[prefix + "METRICS_PORT"]) == metrics_port
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["grpc"] == {"port": grpc_port, "service": PROTO_SERVICE[name]}
    assert liveness["grpc"]["port"] == grpc_port
    assert container["startupProbe"]["grpc"]["port"] == grpc_port
    service_ports = {p["name"]: p for p in OBJECTS[("Service", name)]["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == grpc_port and service_ports["grpc"]["targetPort"] == "grpc"
    annotations = OBJECTS[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port


@pytest.mark.parametrize("name", SERVICES)
def test_one_image_graceful_termination_and_resources(name: str) -> None:
    pod = OBJECTS[("Deployment", name)]["spec"]["template"]["spec"]
    container = _container("Deployment", name)
    assert container["image"] == "ragfleet"
    assert container["args"] == ["serve", name]
    assert "lifecycle" not in container, "no preStop: health NOT_SERVING + drain handles termination"
    grace = float(CONFIG[f"RAGFLEET_{name.upper()}_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > grace
    # A drain must not look like a dead process: liveness may fail only after the drain is over.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()
    assert {"configMapRef": {"name": "ragfleet-config"}} in container["envFrom"]


def test_gateway_reaches_upstreams_through_headless_services() -> None:
    for upstream in UPSTREAMS:
        address = CONFIG[f"RAGFLEET_GATEWAY_{upstream.upper()}_ADDRESS"]
        match = re.fullmatch(r"dns:///([a-z-]+)\.ragfleet\.svc\.cluster\.local:(\d+)", address)
        assert match, address
        assert match.group(1) == upstream and int(match.group(2)) == int(CONFIG[f"RAGFLEET_{upstream.upper()}_PORT"])
        assert OBJECTS[("Service", upstream)]["spec"].get("clusterIP") == "None", f"{upstream} must be headless"
    embedding = CONFIG["RAGFLEET_RETRIEVAL_EMBEDDING_ADDRESS"]
    assert embedding == CONFIG["RAGFLEET_GATEWAY_EMBEDDING_ADDRESS"]


def _service_port(url: str) -> tuple[str, int]:
    match = re.fullmatch(r"(?:[a-z]+://)?([a-z-]+)\.ragfleet\.svc\.cluster\.local:(\d+)(?:/\d+)?", url)
    assert match, url
    name, port = match.group(1), int(match.group(2))
    assert port in {p["port"] for p in OBJECTS[("Service", name)]["spec"]["ports"]}, url
    return name, port


def test_backing_services_match_the_urls_in_the_config() -> None:
    assert _service_port(CONFIG["RAGFLEET_REDIS_URL"]) == ("redis", 6379)
    assert _service_port(CONFIG["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", 4317)
    assert CONFIG["RAGFLEET_RETRIEVAL_STORE"] == "remote"
    assert _service_port(CONFIG["RAGFLEET_RETRIEVAL_QDRANT_URL"]) == ("qdrant", 6333)
    qdrant = OBJECTS[("StatefulSet", "qdrant")]
    (claim,) = qdrant["spec"]["volumeClaimTemplates"]
    mounts = qdrant["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == claim["metadata"]["name"] for m in mounts)
    assert int(CONFIG["RAGFLEET_RETRIEVAL_QDRANT_GRPC_PORT"]) in {p["port"] for p in
                                                                   OBJECTS[("Service", "qdrant")]["spec"]["ports"]}


def test_collector_forwards_otlp_to_jaeger() -> None:
    config = yaml.safe_load(OBJECTS[("ConfigMap", "otel-collector-config")]["data"]["config.yaml"])
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    host, port = config["exporters"][exporter]["endpoint"].rsplit(":", 1)
    assert _service_port(f"{host}:{port}") == ("jaeger", 4317)
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    collector = _container("Deployment", "otel-collector")
    assert _port(collector, "otlp-grpc") == 4317


def test_the_config_map_only_holds_variables_the_services_read_and_they_parse(tmp_path: Path) -> None:
    ragfleet_keys = {key for key in CONFIG if key.startswith("RAGFLEET_")}
    # The API keys file is the mounted Secret: parse the Secret's content where the pod would see it.
    secret = OBJECTS[("Secret", "ragfleet-secrets")]["stringData"]
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(secret["api-keys"])
    mounts = _container("Deployment", "gateway")["volumeMounts"]
    assert str(Path(next(m["mountPath"] for m in mounts if m["name"] == "api-keys")) / "api-keys") == \
        CONFIG["RAGFLEET_GATEWAY_API_KEYS_FILE"]
    values = {**CONFIG, **{k: v for k, v in secret.items() if k.startswith("RAGFLEET_")},
              "RAGFLEET_GATEWAY_API_KEYS_FILE": str(keys_file)}
    configs, consulted = load_all(values)  # raises ConfigError on any malformed value
    unknown = ragfleet_keys - consulted
    assert not unknown, f"ConfigMap keys no service reads (typo?): {sorted(unknown)}"
    assert configs["gateway"].server.port == 50050


def test_dockerfile_runs_ragfleet_serve() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ragfleet"]' in text
    assert 'CMD ["serve", "gateway"]' in text
    for port in ("50050", "50051", "50052", "50053"):
        assert port in text
