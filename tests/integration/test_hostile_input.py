"""Issue 10, defect 2: undecodable bytes on every RPC of every service are INVALID_ARGUMENT in plain words, counted
in the metrics, and leave no traceback in the service's log (real processes, the mesh `ragfleet up` runs)."""

from __future__ import annotations

import re
import urllib.request

import grpc
import pytest

from .conftest import MeshInfo

RPCS = [
    ("gateway", "/ragfleet.v1.GatewayService/Ask", True),
    ("gateway", "/ragfleet.v1.GatewayService/Ingest", False),
    ("gateway", "/ragfleet.v1.GatewayService/DeleteDocuments", False),
    ("embedding", "/ragfleet.v1.EmbeddingService/Embed", False),
    ("retrieval", "/ragfleet.v1.RetrievalService/Search", False),
    ("retrieval", "/ragfleet.v1.RetrievalService/Upsert", False),
    ("retrieval", "/ragfleet.v1.RetrievalService/Delete", False),
    ("generation", "/ragfleet.v1.GenerationService/Generate", True),
]
# The repro (invalid UTF-8 in field 1), a CESU-encoded lone surrogate, truncated bytes, 20k-deep groups
# (within every method's size limit, far past the parser's depth limit).
PAYLOADS = [b"\x0a\x04b\xff\xfeq", b"\x0a\x06\xed\xa0\x80abc", b"\x0a\x10abc", b"\x0b" * 20_000]


def metric(mesh: MeshInfo, service: str, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.mesh.metrics_ports[service]}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return 0.0


def internal_metadata(mesh: MeshInfo, service: str) -> tuple[tuple[str, str], ...]:
    """A service token the internal services accept (LocalMesh writes them), nothing for the gateway: the guard
    authenticates before it parses, so without one the bytes would never be looked at."""
    return () if service == "gateway" else mesh.mesh.internal_metadata("gateway")


@pytest.mark.parametrize("service,method,streaming", RPCS, ids=[m.rsplit("/", 1)[1] for _, m, _ in RPCS])
def test_undecodable_bytes_are_invalid_argument_everywhere(offline_mesh: MeshInfo, service: str, method: str,
                                                           streaming: bool) -> None:
    name = method.lstrip("/")
    rejected = metric(offline_mesh, service, "ragfleet_rpc_rejected_total", {"method": name, "reason": "malformed"})
    counted = metric(offline_mesh, service, "ragfleet_rpc_requests_total",
                     {"method": method, "code": "INVALID_ARGUMENT"})
    metadata = internal_metadata(offline_mesh, service)
    with grpc.insecure_channel(offline_mesh.address(service)) as channel:
        for payload in PAYLOADS:
            if streaming:
                call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as info:
                    list(call(payload, timeout=10, metadata=metadata))
            else:
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as info:
                    call(payload, timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (payload[:8], info.value.details())
            assert "could not be parsed" in info.value.details()
            assert "DecodeError" not in info.value.details()
    assert metric(offline_mesh, service, "ragfleet_rpc_rejected_total",
                  {"method": name, "reason": "malformed"}) == rejected + len(PAYLOADS)
    assert metric(offline_mesh, service, "ragfleet_rpc_requests_total",
                  {"method": method, "code": "INVALID_ARGUMENT"}) == counted + len(PAYLOADS)
    log = offline_mesh.mesh.processes[service].log_path.read_text(errors="replace")
    assert "Traceback" not in log and "DecodeError" not in log
    assert '"level": "ERROR"' not in log
    # And the service still answers well-formed calls: its health says SERVING.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(offline_mesh.address(service)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
