"""One Ask is ONE trace across four processes: the gateway's server span is the root, and each hop (embedding,
retrieval, the streaming generation call) is a gateway client span parenting that service's server span.

Spans are received by an in-process OTLP/gRPC collector: a grpc.aio TraceService built from opentelemetry-proto's
stubs, which the services export to through OTEL_EXPORTER_OTLP_ENDPOINT exactly as they would to a real collector.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from services.cli.mesh import SERVICES, LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.slow

SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
HOPS = {"embedding": "/ragfleet.v1.EmbeddingService/Embed",
        "retrieval": "/ragfleet.v1.RetrievalService/Search",
        "generation": "/ragfleet.v1.GenerationService/Generate"}
ASK = "/ragfleet.v1.GatewayService/Ask"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # resource service.name
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for kv in self.span.attributes:
            value = kv.value
            out[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
        return out


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext,
                     ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        for resource_spans in request.resource_spans:
            service = next((kv.value.string_value for kv in resource_spans.resource.attributes
                            if kv.key == "service.name"), "?")
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def settle(self, *, quiet: float = 1.5, timeout: float = 15.0) -> None:
        """Wait until no span arrived for `quiet` seconds (exporters batch every 500 ms)."""
        deadline = time.monotonic() + timeout
        count, since = len(self.spans), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if len(self.spans) != count:
                count, since = len(self.spans), time.monotonic()
            elif time.monotonic() - since >= quiet:
                return


@pytest.fixture(scope="module")
async def traced_mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[LocalMesh, Collector]]:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "200",
           "RAGFLEET_TRACE_CLIENT_SPANS": "true",  # the whole shape; without them see the unit test in rpc_tracing
           "RAGFLEET_LOG_LEVEL": "WARNING",
           "RAGFLEET_REDIS_URL": "", "RAGFLEET_LLM_BASE_URL": "", "RAGFLEET_GATEWAY_API_KEYS": ""}
    mesh = LocalMesh(data_dir=Path(tmp_path_factory.mktemp("traced-mesh")), env=env)
    # LocalMesh blocks while it waits for health; keep this loop free to receive spans meanwhile.
    await asyncio.to_thread(mesh.start)
    try:
        yield mesh, collector
    finally:
        await asyncio.to_thread(mesh.stop)
        await server.stop(0)


async def _ask(gateway: str, question: str) -> list[gateway_pb2.AskResponse]:
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return [event async for event in stub.Ask(gateway_pb2.AskRequest(question=question, bypass_cache=True),
                                                  timeout=30)]


async def _poke_infrastructure(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        async def list_services():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for _ in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(list_services(),
                                                                                             timeout=5):
            pass


async def test_one_ask_is_one_trace_rooted_at_the_gateway(traced_mesh: tuple[LocalMesh, Collector]) -> None:
    mesh, collector = traced_mesh
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        await gateway_pb2_grpc.GatewayServiceStub(channel).Ingest(gateway_pb2.IngestRequest(documents=[
            gateway_pb2.Document(doc_id="tides", title="Tides", text="Tides are caused by the Moon's gravity."),
            gateway_pb2.Document(doc_id="basalt", title="Basalt", text="Basalt is a dark volcanic rock."),
        ]), timeout=30)
    await collector.settle()
    collector.spans.clear()

    events = await _ask(mesh.address("gateway"), "What causes tides?")
    assert events[0].HasField("sources") and events[-1].HasField("finished")
    assert any(event.HasField("delta") for event in events)
    await collector.settle()

    spans = collector.spans
    trace_ids = {s.span.trace_id for s in spans}
    assert len(trace_ids) == 1, f"one Ask produced {len(trace_ids)} traces: {[(s.service, s.span.name) for s in spans]}"
    by_id = {s.span.span_id: s for s in spans}

    roots = [s for s in spans if not s.span.parent_span_id]
    assert [(r.service, r.span.name, r.span.kind) for r in roots] == [("ragfleet-gateway", ASK, SERVER)]
    root = roots[0]
    # The gateway's stages are attributes of the Ask span (not spans of their own), as in AskFinished.timings; the
    # total is the span's own duration, not an attribute.
    duration_ms = (root.span.end_time_unix_nano - root.span.start_time_unix_nano) / 1e6
    assert duration_ms >= root.attributes["ragfleet.stage.retrieve_ms"] > 0
    assert "ragfleet.stage.total_ms" not in root.attributes and "ragfleet.stage.first_token_ms" in root.attributes

    def ancestors(span: ReceivedSpan) -> list[ReceivedSpan]:
        chain = []
        while span.span.parent_span_id:
            span = by_id[span.span.parent_span_id]  # KeyError = a parent that never arrived: a broken link
            chain.append(span)
        return chain

    for service, method in HOPS.items():
        servers = [s for s in spans if s.service == f"ragfleet-{service}" and s.span.kind == SERVER
                   and s.span.name == method]
        assert servers, f"no {service} server span for {method}"
        for server in servers:
            client = by_id[server.span.parent_span_id]
            assert client.span.kind == CLIENT and client.span.name == method
            assert root in ancestors(client), f"{method} client span is not under the gateway's Ask span"
            attributes = server.attributes
            assert attributes["rpc.system"] == "grpc"
            assert attributes["rpc.method"] == method.lstrip("/")  # fully qualified: service/method
            assert "rpc.service" not in attributes  # merged into rpc.method by the RPC conventions
            assert attributes["rpc.grpc.status_code"] == 0
            assert server.span.start_time_unix_nano >= client.span.start_time_unix_nano
    gateway_clients = {s.span.name for s in spans if s.service == "ragfleet-gateway" and s.span.kind == CLIENT}
    assert set(HOPS.values()) <= gateway_clients
    # The streaming hop is timed to the end of the stream, so it ends inside the Ask span.
    generate = next(s for s in spans if s.span.kind == SERVER and s.span.name == HOPS["generation"])
    assert generate.span.end_time_unix_nano <= root.span.end_time_unix_nano


async def test_health_and_reflection_are_not_traced(traced_mesh: tuple[LocalMesh, Collector]) -> None:
    mesh, collector = traced_mesh
    await collector.settle(quiet=1.0)
    before = len(collector.spans)
    for name in SERVICES:
        await _poke_infrastructure(mesh.address(name))
    await _ask(mesh.address("gateway"), "Is basalt volcanic?")  # a real call, so an exporter flush is observed
    await collector.settle()
    new = collector.spans[before:]
    assert any(s.span.name == ASK for s in new)
    infrastructure = [s.span.name for s in collector.spans if "grpc.health" in s.span.name or
                      "grpc.reflection" in s.span.name]
    assert not infrastructure, infrastructure
