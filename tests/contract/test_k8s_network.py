"""The namespace's trust boundary (deploy/k8s): who can reach whom under the NetworkPolicies, and the internal tokens.

Reachability is computed from the policy objects with the NetworkPolicy semantics (a pod selected by any policy of a
direction is isolated in it; a connection needs the source's egress and the destination's ingress; selectors match
the Deployments' pod labels and the namespaces' labels) and compared with the intended matrix, edge by edge.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._config_vars import SERVICES, load_all
from .test_k8s import CONFIG, OBJECTS, ROOT, schema_problem

NAMESPACE = "ragfleet"
TOKENS_SECRET = "ragfleet-internal-tokens"
CALLERS_CONFIGMAP = "ragfleet-internal-callers"
SCRIPT = ROOT / "scripts" / "k8s_internal_tokens.py"
# Who may call whom (issue 10): embedding <- gateway, retrieval; retrieval <- gateway; generation <- gateway.
ALLOWED_CALLERS = {"embedding": {"gateway", "retrieval"}, "retrieval": {"gateway"}, "generation": {"gateway"}}
SCRAPE_LABEL = {"ragfleet.io/scrape-metrics": "true"}
JAEGER_UI_LABEL = {"ragfleet.io/jaeger-ui": "true"}


@dataclasses.dataclass(frozen=True)
class Port:
    number: int
    name: str | None = None
    protocol: str = "TCP"


@dataclasses.dataclass(frozen=True)
class Peer:
    """A pod (or an address outside the cluster when namespace is None) that may open or accept connections."""

    name: str
    namespace: str | None
    namespace_labels: dict[str, str]
    labels: dict[str, str]
    ip: str
    ports: tuple[Port, ...] = ()


def _namespace_labels(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **(extra or {})}  # the label Kubernetes sets on every namespace


def _our_pods() -> list[Peer]:
    ns_labels = _namespace_labels(NAMESPACE, OBJECTS[("Namespace", NAMESPACE)]["metadata"].get("labels"))
    pods = []
    for index, ((kind, name), doc) in enumerate(sorted(OBJECTS.items())):
        if kind not in ("Deployment", "StatefulSet") or doc["metadata"].get("namespace") != NAMESPACE:
            continue
        template = doc["spec"]["template"]
        ports = tuple(Port(p["containerPort"], p.get("name"), p.get("protocol", "TCP"))
                      for c in template["spec"]["containers"] for p in c.get("ports", []))
        pods.append(Peer(name, NAMESPACE, ns_labels, template["metadata"]["labels"], f"10.0.0.{index + 1}", ports))
    return pods


POLICIES = [doc for (kind, _), doc in OBJECTS.items() if kind == "NetworkPolicy"]
PODS = _our_pods()
POD = {pod.name: pod for pod in PODS}
# Peers outside the namespace. Pod IPs are private (10/8), as a CNI assigns them: ipBlocks may match pods too.
OUTSIDE = [
    Peer("internet-client", None, {}, {}, "203.0.113.7"),
    # Same labels as our gateway, in another namespace: a podSelector alone must not match it.
    Peer("other-namespace-pod", "default", _namespace_labels("default"), {"app.kubernetes.io/name": "gateway"},
         "10.1.0.5", (Port(8080, "http"), Port(443, "https"))),
    Peer("prometheus", "monitoring", _namespace_labels("monitoring", SCRAPE_LABEL), {"app": "prometheus"}, "10.2.0.5"),
    Peer("jaeger-ui-proxy", "ingress", _namespace_labels("ingress", JAEGER_UI_LABEL), {"app": "proxy"}, "10.2.0.6"),
    Peer("kube-dns", "kube-system", _namespace_labels("kube-system"), {"k8s-app": "kube-dns"}, "10.3.0.10",
         (Port(53, "dns", "UDP"), Port(53, "dns-tcp", "TCP"))),
    Peer("llm-endpoint", None, {}, {}, "198.51.100.20", (Port(443), Port(80))),
    Peer("cloud-metadata", None, {}, {}, "169.254.169.254", (Port(80), Port(443))),
    # A node: the kubelet, and the API server on a control-plane node.
    Peer("node-kubelet", None, {}, {}, "192.168.1.10", (Port(10250), Port(443))),
]
# Each of our pods' labels on a pod in another namespace: a selector must not be fooled by labels alone.
OUTSIDE += [Peer(f"impostor-{pod.name}", "default", _namespace_labels("default"), pod.labels, f"10.1.1.{i + 1}")
            for i, pod in enumerate(PODS)]
OUTSIDE_SOURCES = [peer.name for peer in OUTSIDE if peer.name not in ("cloud-metadata", "node-kubelet")]


def _edges(source: str, destination: str, *ports: int, protocol: str = "TCP") -> set[tuple[str, str, int, str]]:
    return {(source, destination, port, protocol) for port in ports}


def _intended() -> set[tuple[str, str, int, str]]:
    edges: set[tuple[str, str, int, str]] = set()
    for source in OUTSIDE_SOURCES:  # the only port anyone outside the namespace reaches
        edges |= _edges(source, "gateway", 50050)
    for callee, callers in ALLOWED_CALLERS.items():
        for caller in callers:
            edges |= _edges(caller, callee, int(CONFIG[f"RAGFLEET_{callee.upper()}_PORT"]))
    edges |= _edges("retrieval", "qdrant", 6333, 6334)
    for service in REDIS_USERS:
        edges |= _edges(service, "redis", 6379)
    for service in SERVICES:
        edges |= _edges(service, "otel-collector", 4317)
        edges |= _edges("prometheus", service, int(CONFIG[f"RAGFLEET_{service.upper()}_METRICS_PORT"]))
    edges |= _edges("otel-collector", "jaeger", 4317)
    edges |= _edges("jaeger-ui-proxy", "jaeger", 16686)
    for service in ("embedding", "generation"):  # the external LLM / embeddings endpoint, HTTPS only
        edges |= _edges(service, "llm-endpoint", 443)
    for pod in PODS:
        edges |= _edges(pod.name, "kube-dns", 53, protocol="UDP") | _edges(pod.name, "kube-dns", 53, protocol="TCP")
    return edges


def _uses_redis(config: object) -> bool:
    """Whether a service's typed config (nested dataclasses included) holds a Redis URL."""
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if field.name == "redis_url" and value:
            return True
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and _uses_redis(value):
            return True
    return False


def _redis_users() -> set[str]:
    configs, _ = load_all({"RAGFLEET_REDIS_URL": CONFIG["RAGFLEET_REDIS_URL"]})
    return {name for name, config in configs.items() if _uses_redis(config)}


REDIS_USERS = _redis_users()


# -- NetworkPolicy semantics ----------------------------------------------------------------------------------------

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and every matchExpression must hold; {} selects everything."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        holds = {"In": key in labels and labels[key] in values, "NotIn": key not in labels or labels[key] not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not holds:
            return False
    return True


def _peer_matches(rule_peer: dict[str, Any], policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if peer.namespace is None:  # pod and namespace selectors match only pods
        return False
    namespace_selector = rule_peer.get("namespaceSelector")
    if namespace_selector is None:
        if peer.namespace != policy_namespace:
            return False
    elif not _selects(namespace_selector, peer.namespace_labels):
        return False
    pod_selector = rule_peer.get("podSelector")
    return pod_selector is None or _selects(pod_selector, peer.labels)


def _port_matches(rule_ports: list[dict[str, Any]] | None, destination: Peer, port: Port) -> bool:
    if not rule_ports:
        return True
    for rule_port in rule_ports:
        if rule_port.get("protocol", "TCP") != port.protocol:
            continue
        wanted = rule_port.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):  # a named port resolves on the destination pod
            if destination.namespace is not None and port.name == wanted:
                return True
        elif wanted <= port.number <= rule_port.get("endPort", wanted):
            return True
    return False


def _policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _allowed(direction: str, pod: Peer, other: Peer, destination: Peer, port: Port) -> bool:
    """Whether `pod`'s policies of `direction` let it talk to `other` (on `destination`'s `port`)."""
    if pod.namespace != NAMESPACE:
        return True  # outside this namespace: not governed by these manifests
    applying = [p for p in POLICIES if p["metadata"]["namespace"] == pod.namespace and direction in _policy_types(p)
                and _selects(p["spec"]["podSelector"], pod.labels)]
    if not applying:
        return True  # not isolated
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any((not rule.get(peers_key) or any(_peer_matches(peer, pod.namespace, other) for peer in rule[peers_key]))
               and _port_matches(rule.get("ports"), destination, port)
               for policy in applying for rule in policy["spec"].get(rules_key) or [])


def _reachable() -> set[tuple[str, str, int, str]]:
    edges = set()
    for source in PODS + [peer for peer in OUTSIDE if peer.name in OUTSIDE_SOURCES]:
        for destination in PODS + OUTSIDE:
            if NAMESPACE not in (source.namespace, destination.namespace):
                continue  # between two outside peers: not these manifests' business
            for port in destination.ports:
                if (_allowed("Egress", source, destination, destination, port)
                        and _allowed("Ingress", destination, source, destination, port)):
                    edges.add((source.name, destination.name, port.number, port.protocol))
    return edges


REACHABLE = _reachable()


def _sources_of(destination: str, port: int | None = None) -> set[str]:
    return {s for s, d, p, _ in REACHABLE if d == destination and (port is None or p == port)}


# -- the policies ---------------------------------------------------------------------------------------------------

def test_a_default_deny_isolates_every_pod_both_ways() -> None:
    deny = [p for p in POLICIES if p["spec"]["podSelector"] == {} and set(_policy_types(p)) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "a NetworkPolicy selecting every pod with policyTypes [Ingress, Egress] and no rules"
    # A new workload added later is covered without touching the policies.
    newcomer = Peer("newcomer", NAMESPACE, PODS[0].namespace_labels, {"app.kubernetes.io/name": "newcomer"},
                    "10.0.0.99", (Port(8080),))
    egress = {peer.name for peer in PODS + OUTSIDE for port in peer.ports
              if _allowed("Egress", newcomer, peer, peer, port)}
    assert egress == {"kube-dns"}, "a new pod may only resolve names"
    assert not any(_allowed("Ingress", newcomer, peer, newcomer, Port(8080)) for peer in PODS + OUTSIDE)


def test_every_policy_names_its_types_and_selects_pods_that_exist() -> None:
    for policy in POLICIES:
        name, spec = policy["metadata"]["name"], policy["spec"]
        assert spec.get("policyTypes"), f"{name}: state policyTypes (the default depends on which rules exist)"
        assert any(_selects(spec["podSelector"], pod.labels) for pod in PODS), f"{name} selects no pod"
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(key) or []:
                for peer in rule.get(peers_key) or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer:  # a label typo matches nothing
                        assert any(_selects(peer["podSelector"], pod.labels) for pod in PODS), (name, peer)


def test_reachability_is_exactly_the_intended_matrix() -> None:
    intended = _intended()
    missing, extra = sorted(intended - REACHABLE), sorted(REACHABLE - intended)
    assert not missing and not extra, f"blocked but needed: {missing}\nallowed but not intended: {extra}"


def test_only_their_callers_reach_the_internal_services() -> None:
    for callee, callers in ALLOWED_CALLERS.items():
        assert _sources_of(callee, int(CONFIG[f"RAGFLEET_{callee.upper()}_PORT"])) == callers, callee
    assert not {("embedding", "generation"), ("retrieval", "generation"), ("generation", "embedding"),
                ("embedding", "retrieval")} & {(s, d) for s, d, _, _ in REACHABLE}
    assert _sources_of("gateway", 50050) >= set(OUTSIDE_SOURCES)  # the public entry point


def test_ingress_alone_admits_only_the_intended_sources() -> None:
    # Defence in depth: an internal service's or a store's own ingress policies must hold even if some pod's egress
    # were opened wide (a later policy, a CNI without egress support).
    intended = _intended()
    for destination in ("embedding", "retrieval", "generation", "qdrant", "redis", "jaeger", "otel-collector"):
        pod = POD[destination]
        for source in PODS + OUTSIDE:
            for port in pod.ports:
                admitted = _allowed("Ingress", pod, source, pod, port)
                wanted = (source.name, destination, port.number, port.protocol) in intended
                if destination == "otel-collector" and source.namespace == NAMESPACE and port.number in (4317, 4318):
                    wanted = True  # the collector takes OTLP from every pod of the namespace, by design
                assert admitted == wanted, f"{destination}:{port.number} from {source.name}: {admitted}"


def test_data_stores_are_reached_only_by_their_users() -> None:
    assert _sources_of("qdrant") == {"retrieval"}
    assert REDIS_USERS == {"gateway", "embedding", "retrieval"}, "a service started or stopped using Redis"
    assert _sources_of("redis") == REDIS_USERS
    assert _sources_of("otel-collector") == set(SERVICES)
    assert _sources_of("jaeger") == {"otel-collector", "jaeger-ui-proxy"}


def test_nothing_reaches_the_metadata_service_the_node_or_other_namespaces() -> None:
    for destination in ("cloud-metadata", "node-kubelet", "other-namespace-pod"):
        assert not _sources_of(destination), destination
    assert {d for s, d, _, _ in REACHABLE if s in ("qdrant", "redis", "jaeger")} == {"kube-dns"}


def test_every_address_in_the_config_is_reachable_by_the_pods_that_use_it() -> None:
    def target(address: str) -> tuple[str, int]:
        host, port = address.split("://", 1)[-1].lstrip("/").split("/", 1)[0].rsplit(":", 1)
        return host.split(".", 1)[0], int(port)

    uses = [(caller, CONFIG[f"RAGFLEET_{caller.upper()}_{callee.upper()}_ADDRESS"])
            for callee, callers in ALLOWED_CALLERS.items() for caller in callers]
    uses += [(service, CONFIG["RAGFLEET_REDIS_URL"]) for service in REDIS_USERS]
    uses += [(service, CONFIG["OTEL_EXPORTER_OTLP_ENDPOINT"]) for service in SERVICES]
    uses += [("retrieval", CONFIG["RAGFLEET_RETRIEVAL_QDRANT_URL"]),
             ("retrieval", f"qdrant:{CONFIG['RAGFLEET_RETRIEVAL_QDRANT_GRPC_PORT']}")]
    for caller, address in uses:
        host, port = target(address)
        assert (caller, host, port, "TCP") in REACHABLE, f"{caller} cannot reach {address}"


def test_strict_validation_catches_a_misspelt_policy_field() -> None:
    # The schema check the other objects get (test_k8s.py) applies to NetworkPolicies too, unknown fields included.
    broken = copy.deepcopy(next(p for p in POLICIES if p["spec"].get("ingress")))
    broken["spec"]["ingress"][0]["form"] = broken["spec"]["ingress"][0].pop("from", [])
    assert schema_problem(broken) is not None
    assert all(schema_problem(policy) is None for policy in POLICIES)


# -- internal tokens ------------------------------------------------------------------------------------------------

def _digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def _callers_file(text: str) -> dict[str, set[str]]:
    """caller -> accepted digests, from `<caller> <sha256 hex>` lines."""
    accepted: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            caller, digest = line.split()
            assert len(digest) == 64 and int(digest, 16) >= 0, line
            accepted.setdefault(caller, set()).add(digest)
    return accepted


def _check_pair(secret: dict[str, Any], configmap: dict[str, Any]) -> dict[str, str]:
    """The Secret's tokens match the ConfigMap's digests, for exactly the allowed caller pairs; returns the tokens."""
    tokens = secret["stringData"]
    callers = {caller for allowed in ALLOWED_CALLERS.values() for caller in allowed}
    assert set(tokens) == callers, "one token per calling service"
    assert len(set(tokens.values())) == len(tokens), "each caller has its own token"
    assert set(configmap["data"]) == set(ALLOWED_CALLERS)
    for callee, text in configmap["data"].items():
        accepted = _callers_file(text)
        assert set(accepted) == ALLOWED_CALLERS[callee], callee
        for caller in accepted:
            assert _digest(tokens[caller]) in accepted[caller], (callee, caller)
        assert not any(token in text for token in tokens.values()), "the ConfigMap holds digests, never tokens"
    return tokens


def _volume_for(pod_spec: dict[str, Any], container: dict[str, Any], env_name: str) -> tuple[dict[str, Any], str]:
    """The volume behind the file an env variable names, and the item key it projects there."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    path = Path(env[env_name])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert "subPath" not in mount, f"{env_name}: a subPath mount never sees updates; mount the volume"
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    source = volume.get("secret") or volume.get("configMap")
    (item,) = [i for i in source["items"] if i["path"] == path.name]
    return volume, item["key"]


def test_shipped_tokens_match_the_shipped_callers_digests() -> None:
    tokens = _check_pair(OBJECTS[("Secret", TOKENS_SECRET)], OBJECTS[("ConfigMap", CALLERS_CONFIGMAP)])
    assert all("REPLACE-ME" in token for token in tokens.values()), "ship obvious placeholders, never real tokens"


@pytest.mark.parametrize("name", SERVICES)
def test_each_pod_gets_only_its_own_token_and_its_own_callers_file(name: str) -> None:
    pod_spec = OBJECTS[("Deployment", name)]["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    env = {e["name"] for e in container.get("env", [])}
    is_caller = any(name in callers for callers in ALLOWED_CALLERS.values())
    token_volumes = [v for v in pod_spec["volumes"] if v.get("secret", {}).get("secretName") == TOKENS_SECRET]
    if is_caller:
        volume, key = _volume_for(pod_spec, container, "RAGFLEET_INTERNAL_TOKEN_FILE")
        assert volume["secret"]["secretName"] == TOKENS_SECRET and key == name
        assert token_volumes == [volume] and [i["key"] for i in volume["secret"]["items"]] == [name]
        assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, "not world-readable"
    else:
        assert "RAGFLEET_INTERNAL_TOKEN_FILE" not in env and not token_volumes, f"{name} calls no service"
    if name in ALLOWED_CALLERS:
        volume, key = _volume_for(pod_spec, container, "RAGFLEET_INTERNAL_CALLERS_FILE")
        assert volume["configMap"]["name"] == CALLERS_CONFIGMAP and key == name
    else:
        assert "RAGFLEET_INTERNAL_CALLERS_FILE" not in env, f"nothing calls {name}"


# -- scripts/k8s_internal_tokens.py ---------------------------------------------------------------------------------

def _run_script(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                            check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _pair(documents: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [("Secret", TOKENS_SECRET),
                                                                       ("ConfigMap", CALLERS_CONFIGMAP)]
    return documents[0], documents[1]


def test_the_script_prints_a_fresh_self_consistent_pair_that_validates() -> None:
    first, second = _pair(_run_script()), _pair(_run_script())
    tokens = _check_pair(*first)
    for document in first:
        assert schema_problem(document) is None, document["kind"]
        shipped = OBJECTS[(document["kind"], document["metadata"]["name"])]
        assert document["metadata"]["namespace"] == shipped["metadata"]["namespace"]  # it replaces the shipped one
        assert document["metadata"]["labels"] == shipped["metadata"]["labels"]
    assert all(len(token) >= 40 and "REPLACE-ME" not in token for token in tokens.values())
    assert not set(tokens.values()) & set(_check_pair(*second).values()), "every run draws new tokens"


def test_the_script_rotates_without_refusing_old_tokens(tmp_path: Path) -> None:
    shipped = OBJECTS[("Secret", TOKENS_SECRET)]["stringData"]
    old_file = tmp_path / "old.yaml"
    old_file.write_text((ROOT / "deploy" / "k8s" / "internal-auth.yaml").read_text())
    # Phase 1: new tokens, and the callers files accept the old and the new ones.
    secret, configmap = _pair(_run_script("--also-accept", str(old_file)))
    new = _check_pair(secret, configmap)
    for callee, text in configmap["data"].items():
        accepted = _callers_file(text)
        for caller in ALLOWED_CALLERS[callee]:
            assert accepted[caller] == {_digest(shipped[caller]), _digest(new[caller])}
    # Last phase: the same new tokens, only their digests.
    new_file = tmp_path / "new.yaml"
    new_file.write_text(yaml.safe_dump_all([secret, configmap]))
    secret2, configmap2 = _pair(_run_script("--tokens-from", str(new_file)))
    assert _check_pair(secret2, configmap2) == new
    assert all(len(digests) == 1 for text in configmap2["data"].values() for digests in _callers_file(text).values())


def test_the_script_refuses_a_file_without_tokens(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(OBJECTS[("ConfigMap", CALLERS_CONFIGMAP)] | {"_file": None}))
    result = subprocess.run([sys.executable, str(SCRIPT), "--tokens-from", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "no Secret ragfleet-internal-tokens" in result.stderr and not result.stdout


# -- the manifests against the runtime's own token check ------------------------------------------------------------

def _authenticate_all(tmp_path: Path, secret: dict[str, Any], configmap: dict[str, Any]) -> dict[tuple[str, str], bool]:
    """(callee, caller) -> whether the callee's authenticator, reading the mounted callers file, accepts the token
    the caller's pods present (read through the runtime's token file reader, as the pods would)."""
    internal_auth = pytest.importorskip("services.runtime.internal_auth")
    from services.runtime.errors import Unauthenticated

    outcome: dict[tuple[str, str], bool] = {}
    for caller, token in secret["stringData"].items():
        token_file = tmp_path / f"{caller}.token"
        token_file.write_text(token)
        metadata = internal_auth.CallerToken(str(token_file)).metadata()
        for callee, text in configmap["data"].items():
            callers_file = tmp_path / f"{callee}.callers"
            callers_file.write_text(text)
            try:
                outcome[(callee, caller)] = internal_auth.CallersAuthenticator(str(callers_file)).authenticate(
                    metadata) == caller
            except Unauthenticated:
                outcome[(callee, caller)] = False
    return outcome


def _expected_outcome() -> dict[tuple[str, str], bool]:
    callers = {caller for allowed in ALLOWED_CALLERS.values() for caller in allowed}
    return {(callee, caller): caller in ALLOWED_CALLERS[callee] for callee in ALLOWED_CALLERS for caller in callers}


def test_the_runtime_accepts_exactly_the_allowed_callers_with_the_shipped_and_generated_files(tmp_path: Path) -> None:
    shipped = (OBJECTS[("Secret", TOKENS_SECRET)], OBJECTS[("ConfigMap", CALLERS_CONFIGMAP)])
    assert _authenticate_all(tmp_path, *shipped) == _expected_outcome()
    assert _authenticate_all(tmp_path, *_pair(_run_script())) == _expected_outcome()


@pytest.mark.parametrize("name", SERVICES)
def test_each_pod_environment_enables_internal_auth(name: str, tmp_path: Path) -> None:
    # The variables the Deployment sets, with the mounted files where the pod would find them, make the runtime's
    # config turn authentication on with the files it needs for this service's role.
    internal_auth = pytest.importorskip("services.runtime.internal_auth")
    (container,) = OBJECTS[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    environ = {**CONFIG, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    config = internal_auth.InternalAuthConfig.from_env(name, environ)
    assert config.enabled
    assert (config.token_file is not None) == any(name in c for c in ALLOWED_CALLERS.values())
    assert (config.callers_file is not None) == (name in ALLOWED_CALLERS)
