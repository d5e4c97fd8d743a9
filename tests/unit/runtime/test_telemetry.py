"""Health checks and reflection are infrastructure: neither traced (telemetry) nor counted (rpc_handlers)."""

from __future__ import annotations

import pytest

from services.runtime import rpc_handlers, telemetry


@pytest.mark.parametrize(("method", "traced"), [
    ("/ragfleet.v1.GatewayService/Ask", True),
    (b"/ragfleet.v1.EmbeddingService/Embed", True),  # grpc.aio client call details carry bytes
    ("/grpc.health.v1.Health/Check", False),
    (b"/grpc.health.v1.Health/Watch", False),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
])
def test_infrastructure_rpcs_are_not_traced(method: str | bytes, traced: bool) -> None:
    assert telemetry.traced(method) is traced


def test_the_metrics_interceptor_skips_the_same_methods() -> None:
    assert rpc_handlers.INFRA_METHOD_PREFIXES is telemetry.INFRA_METHOD_PREFIXES
