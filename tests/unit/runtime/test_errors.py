"""Domain errors reach the client as the right status codes, mapped once by the runtime's interceptor."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from services.runtime import errors
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2, \
    generation_pb2_grpc

from .conftest import ScriptedGeneration, downstream_error, running_server

EMBED_METHOD = "/ragfleet.v1.EmbeddingService/Embed"


def _count(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("ragfleet_rpc_requests_total", {"method": method, "code": code}) or 0.0


@pytest.mark.parametrize(("text", "code", "details"), [
    ("", grpc.StatusCode.INVALID_ARGUMENT, "texts: must hold 1 to 64 texts, got 0"),
    ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (256 texts)"),
    ("down", grpc.StatusCode.UNAVAILABLE, "redis at 127.0.0.1:1 is down"),
    ("downstream", grpc.StatusCode.UNAVAILABLE, "a downstream service: connection refused"),
    ("bug", grpc.StatusCode.INTERNAL, "ValueError: unexpected shape"),
])
async def test_unary_errors_map_to_status_codes(text: str, code: grpc.StatusCode, details: str) -> None:
    async with running_server() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            before = _count(EMBED_METHOD, code.name)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Embed(embedding_pb2.EmbedRequest(texts=[text] if text else []), timeout=5)
            assert info.value.code() == code
            assert details in info.value.details()
            assert _count(EMBED_METHOD, code.name) == before + 1
            # The server survives every failure and keeps answering.
            ok = await stub.Embed(embedding_pb2.EmbedRequest(texts=["fine", "also"]), timeout=5)
            assert ok.model == "scripted" and len(ok.embeddings) == 2
        assert server.in_flight.count == 0


async def test_streaming_validation_fails_before_any_message() -> None:
    async with running_server() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            call = stub.Generate(generation_pb2.GenerateRequest(question=""), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pytest.fail("no message may precede a validation error")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "question" in info.value.details()


async def test_mid_stream_failure_ends_the_stream_with_one_status() -> None:
    async with running_server(generation=ScriptedGeneration()) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            params = common_pb2.GenerationParams(max_tokens=5)
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for message in stub.Generate(generation_pb2.GenerateRequest(question="fail", params=params),
                                                   timeout=5):
                    received.append(message.delta.text)
            assert received == ["t0 ", "t1 "]
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "llm at http://127.0.0.1:1 is down" in info.value.details()
        assert server.in_flight.count == 0


@pytest.mark.parametrize(("code", "expected", "fragment"), [
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded, "retrieval service did not answer in time"),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable, "retrieval service: boom"),
    (grpc.StatusCode.UNKNOWN, errors.Unavailable, "retrieval service: boom"),
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, "retrieval service: boom"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Overloaded, "retrieval service: boom"),
    (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated, "retrieval service: boom"),
    (grpc.StatusCode.DATA_LOSS, errors.Unavailable, "retrieval service: boom"),
])
def test_from_rpc_error_names_the_downstream_service(code: grpc.StatusCode, expected: type, fragment: str) -> None:
    mapped = errors.from_rpc_error("retrieval", downstream_error(code, "boom"))
    assert type(mapped) is expected
    assert fragment in mapped.message


def test_require() -> None:
    errors.require(True, "unused")
    with pytest.raises(errors.InvalidArgument, match="top_k: must be in 1..100"):
        errors.require(False, "top_k: must be in 1..100")
