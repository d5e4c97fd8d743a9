"""The RPC spans (services.runtime.rpc_tracing): client span -> server span in one trace, the gRPC attributes, the
final status, and the caller's token on the same metadata as the trace context."""

from __future__ import annotations

from typing import AsyncIterator

import grpc
import pytest
from opentelemetry import trace

from services.runtime import telemetry
from services.runtime.errors import NotFound
from services.runtime.guard import GuardPolicy
from services.runtime.rpc_handlers import InFlight, RpcHandlers

SERVICE = "ragfleet.v1.TestService"


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    seen: list[str] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(dict(context.invocation_metadata())["authorization"])
        return request

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise NotFound("no such thing")

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    server = grpc.aio.server()
    RpcHandlers(InFlight(), GuardPolicy()).add(server, SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Count": grpc.unary_stream_rpc_method_handler(count)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = telemetry.traced_channel(grpc.aio.insecure_channel(f"127.0.0.1:{port}"),
                                       lambda: (("authorization", "Bearer t"),), client_spans=True)
    channel.port = port  # type: ignore[attr-defined]
    channel.seen = seen  # type: ignore[attr-defined]
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_call_is_a_client_span_parenting_the_server_span(channel, span_exporter) -> None:
    assert await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
    assert channel.seen == ["Bearer t"]  # the token rides with the trace context
    spans = {s.kind: s for s in span_exporter.get_finished_spans() if s.name == f"/{SERVICE}/Echo"}
    client, server = spans[trace.SpanKind.CLIENT], spans[trace.SpanKind.SERVER]
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    for span in (client, server):
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.method"] == f"{SERVICE}/Echo" and "rpc.service" not in span.attributes
        assert span.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["net.peer.ip"] == "127.0.0.1"
    # What tells nothing is not recorded: the ephemeral port, a name that only said "localhost".
    assert "net.peer.port" not in server.attributes and "net.peer.name" not in server.attributes
    # A caller from outside the mesh (no mesh authenticator on this service): its user agent is kept.
    assert server.attributes["rpc.user_agent"].startswith("grpc-python")


class _MeshAuth:
    span_attribute = "ragfleet.caller"
    mesh_callers = True

    def authenticate(self, metadata) -> str:  # type: ignore[no-untyped-def]
        return "gateway"


async def test_a_mesh_only_method_names_its_caller_without_its_address_or_user_agent(span_exporter) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    RpcHandlers(InFlight(), GuardPolicy(authenticators={SERVICE: _MeshAuth()})).add(
        server, SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            assert await plain.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
    finally:
        await server.stop(None)
    (span,) = [s for s in span_exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert span.attributes["ragfleet.caller"] == "gateway"
    # The caller's replica is its own span's resource (host.name), this span's parent: no peer address here.
    assert "net.peer.ip" not in span.attributes and "rpc.user_agent" not in span.attributes


async def test_a_failed_call_carries_its_status_on_both_spans(channel, span_exporter) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary(f"/{SERVICE}/Missing")(b"", timeout=5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    spans = {s.kind: s for s in span_exporter.get_finished_spans() if s.name == f"/{SERVICE}/Missing"}
    client, server = spans[trace.SpanKind.CLIENT], spans[trace.SpanKind.SERVER]
    assert client.attributes["rpc.grpc.status_code"] == server.attributes["rpc.grpc.status_code"] == 5
    assert client.status.status_code == trace.StatusCode.ERROR
    # NOT_FOUND is the caller's problem, not the server's (semantic conventions for server spans).
    assert server.status.status_code == trace.StatusCode.UNSET


async def test_a_stream_span_ends_with_the_stream(channel, span_exporter) -> None:
    assert [m async for m in channel.unary_stream(f"/{SERVICE}/Count")(b"", timeout=5)] == [b"\0", b"\1", b"\2"]
    spans = {s.kind: s for s in span_exporter.get_finished_spans() if s.name == f"/{SERVICE}/Count"}
    client, server = spans[trace.SpanKind.CLIENT], spans[trace.SpanKind.SERVER]
    assert server.parent.span_id == client.context.span_id
    assert client.end_time >= server.end_time


async def test_a_stream_read_to_eof_ends_its_span_ok_and_a_cancelled_one_is_no_fault(channel, span_exporter) -> None:
    call = channel.unary_stream(f"/{SERVICE}/Count")(b"", timeout=5)
    assert [await call.read() for _ in range(3)] == [b"\0", b"\1", b"\2"]
    assert not [s for s in span_exporter.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]  # not over yet
    assert await call.read() is grpc.aio.EOF
    ended = [s for s in span_exporter.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    assert [s.attributes["rpc.grpc.status_code"] for s in ended] == [0]
    span_exporter.clear()

    call = channel.unary_stream(f"/{SERVICE}/Count")(b"", timeout=5)
    assert await call.read() == b"\0"
    assert call.cancel()
    assert call.cancelled() or await call.code() == grpc.StatusCode.CANCELLED  # the rest is the real call's
    client = [s for s in span_exporter.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    assert [s.attributes["rpc.grpc.status_code"] for s in client] == [grpc.StatusCode.CANCELLED.value[0]]
    assert client[0].status.status_code == trace.StatusCode.UNSET  # the caller gave up: not the server's fault


async def test_generated_stubs_register_wrapped_handlers_and_a_stale_stub_is_refused() -> None:
    from services.runtime.errors import InvalidArgument
    from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc

    class Embedder(embedding_pb2_grpc.EmbeddingServiceServicer):
        async def Embed(self, request, context):  # noqa: N802 - the proto's name
            raise InvalidArgument(f"{len(request.texts)} texts")  # mapped to its status by the wrapper

    server = grpc.aio.server()
    RpcHandlers(InFlight(), GuardPolicy()).register(embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
                                                    Embedder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(plain)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Embed(embedding_pb2.EmbedRequest(texts=["a", "b"]), timeout=5)
            assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "2 texts")
            with pytest.raises(grpc.aio.AioRpcError) as malformed:  # the guard parses the raw bytes
                await plain.unary_unary("/ragfleet.v1.EmbeddingService/Embed")(b"\xff\xff", timeout=5)
            assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(None)

    def registers_nothing(servicer: object, server: object) -> None:
        server.add_generic_rpc_handlers(())  # type: ignore[attr-defined] - what stubs before grpcio 1.63 did only

    with pytest.raises(RuntimeError, match="registered no methods"):
        RpcHandlers(InFlight(), GuardPolicy()).register(registers_nothing, object(), grpc.aio.server())


async def test_without_client_spans_the_server_span_hangs_under_the_callers_span(channel, span_exporter) -> None:
    """RAGFLEET_TRACE_CLIENT_SPANS off (the default): the call carries the caller's own span as traceparent, so the
    trace stays one piece with one span fewer per hop."""
    lean = telemetry.traced_channel(grpc.aio.insecure_channel(f"127.0.0.1:{channel.port}"),
                                    lambda: (("authorization", "Bearer t"),), client_spans=False)
    try:
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            assert await lean.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5) == b"hi"
            assert [m async for m in lean.unary_stream(f"/{SERVICE}/Count")(b"", timeout=5)] == [b"\0", b"\1", b"\2"]
        spans = [s for s in span_exporter.get_finished_spans() if s.name.startswith(f"/{SERVICE}/")]
        assert sorted((s.name, s.kind) for s in spans) == [(f"/{SERVICE}/Count", trace.SpanKind.SERVER),
                                                            (f"/{SERVICE}/Echo", trace.SpanKind.SERVER)]
        for span in spans:
            assert span.parent.span_id == caller.get_span_context().span_id
            assert span.context.trace_id == caller.get_span_context().trace_id
        assert channel.seen == ["Bearer t"], "the token still rides on every call"
    finally:
        await lean.close()
