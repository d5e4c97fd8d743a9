"""The runtime's guard over real gRPC in-process: malformed, oversized and unauthenticated requests are refused with
a clear status before the handler runs, counted, and never logged as errors."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from services.runtime.config import ServerConfig
from services.runtime.errors import Unauthenticated
from services.runtime.guard import current_principal, format_size
from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc, generation_pb2_grpc
from services.runtime.serve import Binding, GrpcServer

from .conftest import EMBEDDING, GENERATION, ScriptedEmbedding, ScriptedGeneration

EMBED = f"/{EMBEDDING}/Embed"
GENERATE = f"/{GENERATION}/Generate"

HOSTILE = {
    "invalid UTF-8": b"\x0a\x04b\xff\xfeq",
    "a lone surrogate": b"\x0a\x06\xed\xa0\x80abc",
    "truncated bytes": b"\x0a\x10abc",
    "100k-deep groups": b"\x0b" * 100_000,
}


class KeyAuth:
    span_attribute = "ragfleet.caller"
    mesh_callers = True

    def authenticate(self, metadata):
        for name, value in metadata or ():
            if name == "authorization" and value == "Bearer right":
                return "gateway"
        raise Unauthenticated("internal call without a service token: send 'authorization: Bearer <token>'")


class RecordingEmbedding(ScriptedEmbedding):
    def __init__(self) -> None:
        super().__init__()
        self.principals: list[str | None] = []

    async def Embed(self, request, context):
        self.principals.append(current_principal())
        return await super().Embed(request, context)


@asynccontextmanager
async def server(*, embed_limit: int | None = None, authenticator=None, max_message_mb: int = 64,
                 embedding: ScriptedEmbedding | None = None) -> AsyncIterator[grpc.aio.Channel]:
    config = ServerConfig(component="test", host="127.0.0.1", port=0, metrics_port=0, max_message_mb=max_message_mb)
    limits = {"Embed": embed_limit} if embed_limit else {}
    srv = GrpcServer(config, authenticator=authenticator, bindings=[
        Binding(EMBEDDING, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, embedding or ScriptedEmbedding(),
                max_request_bytes=limits),
        Binding(GENERATION, generation_pb2_grpc.add_GenerationServiceServicer_to_server, ScriptedGeneration(),
                max_request_bytes={"Generate": 1024 * 1024}),
    ])
    port = await srv.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await srv.stop(grace=0)


async def settled(predicate, timeout: float = 2.0) -> None:
    """The client and the server share this event loop: let the server's handler finish (its metrics come last)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def call_raw(channel: grpc.aio.Channel, method: str, payload: bytes, metadata=None) -> grpc.aio.AioRpcError:
    if method == GENERATE:
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call(payload, timeout=5, metadata=metadata):
                pass
    else:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(payload, timeout=5, metadata=metadata)
    return info.value


@pytest.mark.parametrize("method", [EMBED, GENERATE])
@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_undecodable_bytes_are_invalid_argument_counted_and_not_logged_as_errors(method, kind, caplog):
    caplog.set_level(logging.INFO)
    name = method.lstrip("/")
    rejected = sample("ragfleet_rpc_rejected_total", method=name, reason="malformed")
    counted = sample("ragfleet_rpc_requests_total", method=method, code="INVALID_ARGUMENT")
    async with server() as channel:
        error = await call_raw(channel, method, HOSTILE[kind])
        await settled(lambda: sample("ragfleet_rpc_requests_total", method=method, code="INVALID_ARGUMENT") > counted)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be parsed" in error.details()
    assert "DecodeError" not in error.details() and "Error parsing" not in error.details()
    if kind in ("invalid UTF-8", "a lone surrogate"):
        assert "not valid UTF-8" in error.details()
    assert sample("ragfleet_rpc_rejected_total", method=name, reason="malformed") == rejected + 1
    assert sample("ragfleet_rpc_requests_total", method=method, code="INVALID_ARGUMENT") == counted + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_request_over_its_method_limit_is_resource_exhausted_before_parsing():
    embedding = ScriptedEmbedding()
    before = sample("ragfleet_rpc_rejected_total", method=EMBED.lstrip("/"), reason="too_large")
    async with server(embed_limit=1024, embedding=embedding) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(embedding_pb2.EmbedRequest(texts=["x" * 2048]), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == (f"EmbedRequest is 2.0 KiB; the limit for {EMBEDDING}/Embed is 1 KiB")
        # Undecodable bytes over the limit are refused for their size: nothing was parsed.
        error = await call_raw(channel, EMBED, b"\xff" * 4096)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = await stub.Embed(embedding_pb2.EmbedRequest(texts=["x" * 900]), timeout=5)
    assert len(reply.embeddings) == 1 and embedding.calls == 1
    assert sample("ragfleet_rpc_rejected_total", method=EMBED.lstrip("/"), reason="too_large") == before + 2


async def test_the_server_receive_limit_is_its_largest_method_limit():
    async with server(embed_limit=256 * 1024) as channel:
        # Over every method's limit: gRPC core refuses it before the guard sees it.
        error = await call_raw(channel, EMBED, b"\x0a" + b"\x80" * (300 * 1024))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    srv = GrpcServer(ServerConfig(component="t", port=0, metrics_port=0), bindings=[
        Binding(EMBEDDING, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, ScriptedEmbedding(),
                max_request_bytes={"Embed": 256 * 1024}),
        Binding(GENERATION, generation_pb2_grpc.add_GenerationServiceServicer_to_server, ScriptedGeneration(),
                max_request_bytes={"Generate": 4096})])
    assert srv.receive_limit == 256 * 1024


async def test_authentication_runs_before_the_handler_and_names_the_caller():
    embedding = RecordingEmbedding()
    before = sample("ragfleet_rpc_rejected_total", method=EMBED.lstrip("/"), reason="unauthenticated")
    async with server(authenticator=KeyAuth(), embedding=embedding) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        request = embedding_pb2.EmbedRequest(texts=["hello"])
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Embed(request, timeout=5, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "internal call without a service token" in info.value.details()
        # Garbage from an unauthenticated caller is refused for the caller, not parsed.
        error = await call_raw(channel, EMBED, HOSTILE["invalid UTF-8"])
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert embedding.calls == 0
        reply = await stub.Embed(request, timeout=5, metadata=(("authorization", "Bearer right"),))
    assert len(reply.embeddings) == 1 and embedding.principals == ["gateway"]
    assert sample("ragfleet_rpc_rejected_total", method=EMBED.lstrip("/"), reason="unauthenticated") == before + 3


def test_sizes_read_plainly():
    assert format_size(5 * 1024 * 1024 + 10) == "5.0 MiB"
    assert format_size(64 * 1024, exact=True) == "64 KiB"
    assert format_size(900) == "900 bytes"
