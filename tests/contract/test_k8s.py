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
SECRET = "ragfleet-secrets"
# A typical LLM streaming rate: generation's drain grace must let a default-length answer finish at this rate.
TOKENS_PER_SECOND = 20
# A new replica gets gateway traffic once a connection is recycled: the upstreams' max_connection_age bounds that wait.
MAX_CONNECTION_AGE_BOUND = 120


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


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Deployment and StatefulSet."""
    return [(name, doc["spec"]["template"]["spec"]) for (kind, name), doc in OBJECTS.items()
            if kind in ("Deployment", "StatefulSet")]


def _parse_configs(tmp_path: Path) -> tuple[dict[str, Any], set[str]]:
    """Every service's typed config built from the ConfigMap plus the Secret, as the pods would see them."""
    secret = OBJECTS[("Secret", SECRET)]["stringData"]
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(secret["api-keys"])
    values = {**CONFIG, **{k: v for k, v in secret.items() if k.startswith("RAGFLEET_")},
              "RAGFLEET_GATEWAY_API_KEYS_FILE": str(keys_file)}
    return load_all(values)  # raises ConfigError on any malformed value


def test_every_object_is_namespaced_and_labelled() -> None:
    for (kind, name), doc in OBJECTS.items():
        assert doc["apiVersion"] and doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ragfleet", name
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "ragfleet", f"{kind}/{name}"


def test_the_namespace_comes_first_with_k_and_with_f() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    first_file = sorted(p.name for p in K8S.glob("*.yaml"))[0]  # `kubectl apply -f dir/` goes in name order
    assert first_file == kustomization["resources"][0] == "00-namespace.yaml"
    assert OBJECTS[("Namespace", "ragfleet")]["_file"] == first_file


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
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu" and 0 < cpu["resource"]["target"]["averageUtilization"] <= 100
    # Plus the signal that saturates the service first (test_autoscaling.py: served by the adapter rules).
    assert [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"], f"{name}: scales on CPU only"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count: a `replicas` here would reset a scaled-out Deployment on every apply.
    assert "replicas" not in deployment["spec"], f"{name}: drop spec.replicas, the HPA sets it"


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_a_disruption_budget_and_spreads_over_nodes(name: str) -> None:
    deployment = OBJECTS[("Deployment", name)]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = OBJECTS[("PodDisruptionBudget", name)]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    # maxUnavailable 1 leaves a replica serving only if there are always at least two.
    assert OBJECTS[("HorizontalPodAutoscaler", name)]["spec"]["minReplicas"] >= 2
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_host = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert len(by_host) == 1, spread
    (constraint,) = by_host
    assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    assert selector.items() <= constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()


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
    # No preStop: on SIGTERM health turns NOT_SERVING, the callers' channels (client-side health checking) stop
    # routing new calls to the pod at once, and the in-flight ones drain for the grace.
    assert "lifecycle" not in container, "no preStop: health NOT_SERVING + client health checks + drain"
    grace = float(CONFIG[f"RAGFLEET_{name.upper()}_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > grace
    # A drain must not look like a dead process: liveness may fail only after the drain is over.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()
    assert {"configMapRef": {"name": "ragfleet-config"}} in container["envFrom"]


def test_drains_outlast_a_default_answer_stream(tmp_path: Path) -> None:
    configs, _ = _parse_configs(tmp_path)
    generation, gateway = configs["generation"], configs["gateway"]
    stream_seconds = generation.defaults.max_tokens / TOKENS_PER_SECOND
    assert generation.server.grace_seconds > stream_seconds, "a default answer must finish during a drain"
    # The gateway relays the stream: its own drain must not cut it either.
    assert gateway.server.grace_seconds >= generation.server.grace_seconds
    # When a connection is recycled (GOAWAY), the streams on it get max_connection_age_grace to finish.
    assert generation.server.max_connection_age_grace_seconds >= generation.server.grace_seconds


@pytest.mark.parametrize("name", UPSTREAMS)
def test_upstreams_recycle_connections_so_new_replicas_get_traffic(name: str, tmp_path: Path) -> None:
    # dns:/// channels re-resolve only when a connection closes: new replicas wait up to max_connection_age.
    assert f"RAGFLEET_{name.upper()}_MAX_CONNECTION_AGE_SECONDS" in CONFIG
    configs, _ = _parse_configs(tmp_path)
    assert configs[name].server.max_connection_age_seconds <= MAX_CONNECTION_AGE_BOUND


def test_embedding_requests_a_core_per_onnx_thread() -> None:
    resources = _container("Deployment", "embedding")["resources"]
    threads = int(CONFIG["RAGFLEET_EMBEDDING_ONNX_THREADS"])
    assert _cpu(resources["requests"]["cpu"]) >= threads
    assert _cpu(resources["limits"]["cpu"]) >= _cpu(resources["requests"]["cpu"])


def test_secrets_reach_only_the_containers_that_need_them() -> None:
    secret = OBJECTS[("Secret", SECRET)]["stringData"]
    for name, pod in _workloads():
        for container in pod["containers"]:
            # A whole-Secret envFrom would put the gateway's tenant keys into every such container's environment.
            assert not any("secretRef" in source for source in container.get("envFrom", [])), name
            refs = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container.get("env", [])
                    if "secretKeyRef" in env.get("valueFrom", {})}
            for env_name, ref in refs.items():
                assert ref["name"] == SECRET and ref["key"] in secret and ref["key"] != "api-keys", (name, env_name)
        # The internal tokens (another Secret) are scoped per caller: tests/contract/test_k8s_network.py.
        mounts = [v["secret"] for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == SECRET]
        if name != "gateway":
            assert not mounts, f"{name} mounts {SECRET}"
    for name in ("embedding", "generation"):
        env = {e["name"]: e for e in _container("Deployment", name).get("env", [])}
        ref = env["RAGFLEET_LLM_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": SECRET, "key": "RAGFLEET_LLM_API_KEY", "optional": True}
    (keys_volume,) = [v["secret"] for v in OBJECTS[("Deployment", "gateway")]["spec"]["template"]["spec"]["volumes"]
                      if v.get("secret", {}).get("secretName") == SECRET]
    assert keys_volume["secretName"] == SECRET and keys_volume["items"] == [{"key": "api-keys", "path": "api-keys"}]


def test_the_shipped_secret_is_a_placeholder_with_authentication_on(tmp_path: Path) -> None:
    # An empty keys file would turn authentication off; real keys do not belong in the repository.
    configs, _ = _parse_configs(tmp_path)
    keys = configs["gateway"].api_keys
    assert keys and all("REPLACE-ME" in key for key in keys), "ship an obvious placeholder key, never a real one"


def test_statefulsets_are_governed_by_headless_services() -> None:
    statefulsets = {name: doc for (kind, name), doc in OBJECTS.items() if kind == "StatefulSet"}
    assert "qdrant" in statefulsets
    for name, statefulset in statefulsets.items():
        governing = OBJECTS[("Service", statefulset["spec"]["serviceName"])]["spec"]
        assert governing.get("clusterIP") == "None", f"{name}: serviceName must name a headless Service"
        assert governing["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()


def test_qdrant_runs_unprivileged_and_has_time_to_load() -> None:
    pod = OBJECTS[("StatefulSet", "qdrant")]["spec"]["template"]["spec"]
    container = _container("StatefulSet", "qdrant")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert "fsGroup" in pod["securityContext"], "the storage volume must be writable by the non-root user"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    if container["securityContext"].get("readOnlyRootFilesystem"):
        # Qdrant panics at start-up when it cannot write its init marker.
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        marker_dir = str(Path(env["QDRANT_INIT_FILE_PATH"]).parent)
        assert marker_dir in {m["mountPath"] for m in container["volumeMounts"]}


def test_redis_persists_conversations() -> None:
    kinds = [kind for (kind, name) in OBJECTS if name == "redis" and kind in ("Deployment", "StatefulSet")]
    assert len(kinds) == 1, kinds
    (kind,) = kinds
    workload = OBJECTS[(kind, "redis")]
    container = _container(kind, "redis")
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data_dir]
    if kind == "StatefulSet":
        assert mount["name"] in {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
    else:
        assert workload["spec"]["replicas"] == 1
        assert workload["spec"]["strategy"]["type"] == "Recreate", "one pod at a time on a ReadWriteOnce volume"
        (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in OBJECTS
    assert OBJECTS[("Service", "redis")]["spec"]["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis"}]


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
    mounts = _container("Deployment", "gateway")["volumeMounts"]
    assert str(Path(next(m["mountPath"] for m in mounts if m["name"] == "api-keys")) / "api-keys") == \
        CONFIG["RAGFLEET_GATEWAY_API_KEYS_FILE"]
    configs, consulted = _parse_configs(tmp_path)
    unknown = ragfleet_keys - consulted
    assert not unknown, f"ConfigMap keys no service reads (typo?): {sorted(unknown)}"
    assert configs["gateway"].server.port == 50050


def test_dockerfile_runs_ragfleet_serve() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ragfleet"]' in text
    assert 'CMD ["serve", "gateway"]' in text
    for port in ("50050", "50051", "50052", "50053"):
        assert port in text


# The oldest Kubernetes minor still in wide use that has every API these manifests rely on (native gRPC probes
# became GA in 1.27, policy/v1 PDBs and autoscaling/v2 HPAs earlier).
KUBERNETES_VERSION = "1.30"


def schema_problem(doc: dict[str, Any]) -> str | None:
    """What is wrong with `doc` against the Kubernetes API schema (strict: unknown fields too), or None."""
    import jsonschema
    import kubernetes_validate

    try:
        kubernetes_validate.validate({k: v for k, v in doc.items() if k != "_file"}, KUBERNETES_VERSION, strict=True)
    except jsonschema.ValidationError as exc:  # what the schema check raises, with the field's path
        return f"{exc.message} at {list(exc.absolute_path)}"
    return None


@pytest.mark.parametrize("key", sorted(OBJECTS), ids=lambda key: f"{key[0]}/{key[1]}")
def test_every_object_is_valid_against_the_kubernetes_api_schema(key: tuple[str, str]) -> None:
    # kubernetes-validate ships the API's OpenAPI schemas: a misspelt field (strict: unknown fields fail too), a
    # wrong type or a missing required field fails here instead of at `kubectl apply`.
    problem = schema_problem(OBJECTS[key])
    assert problem is None, f"{OBJECTS[key]['_file']}: {key[0]}/{key[1]}: {problem}"
