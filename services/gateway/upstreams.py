"""gRPC clients for the retrieval and generation services over the process-wide ChannelPool (the embedding
service's is the runtime's ``EmbedClient``, shared with retrieval).

Every call carries a deadline. Idempotent unary methods (Embed, Search, Upsert, Delete) are retried by gRPC itself
through the channel's retryPolicy; Generate is a stream and is never listed, so a started stream is never replayed.
A failed call becomes a domain error naming the service (``from_rpc_error``), so "generation service: ..." reaches
the client instead of an anonymous UNAVAILABLE.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.runtime.channels import ChannelPool
from services.runtime.errors import from_rpc_error
from services.runtime.pb.ragfleet.v1 import generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

_RETRIEVAL = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"]
_GENERATION = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]


def _methods(service: ServiceDescriptor, *names: str) -> list[tuple[str, str]]:
    """(service, method) pairs for the channel's retryPolicy, looked up so that a renamed RPC fails at import."""
    return [(service.full_name, service.methods_by_name[name].name) for name in names]


class RetrievalClient:
    def __init__(self, pool: ChannelPool, address: str) -> None:
        channel = pool.get(address, health_service=_RETRIEVAL.full_name,
                           retry_methods=_methods(_RETRIEVAL, "Search", "Upsert", "Delete"))
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    async def search(self, request: retrieval_pb2.SearchRequest, *, timeout: float) -> retrieval_pb2.SearchResponse:
        try:
            return await self._stub.Search(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("retrieval", exc) from None

    async def upsert(self, request: retrieval_pb2.UpsertRequest, *, timeout: float) -> retrieval_pb2.UpsertResponse:
        try:
            return await self._stub.Upsert(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("retrieval", exc) from None

    async def delete(self, request: retrieval_pb2.DeleteRequest, *, timeout: float) -> retrieval_pb2.DeleteResponse:
        try:
            return await self._stub.Delete(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("retrieval", exc) from None


class GenerationClient:
    def __init__(self, pool: ChannelPool, address: str) -> None:
        self._stub = generation_pb2_grpc.GenerationServiceStub(pool.get(address, health_service=_GENERATION.full_name))

    async def generate_stream(self, request: generation_pb2.GenerateRequest, *,
                              timeout: float) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Yield the generation events as they arrive. Closing this generator (client gone, deadline, error)
        cancels the call, which cancels the generation handler and, through it, the LLM HTTP request."""
        call = self._stub.Generate(request, timeout=timeout)
        try:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    return
                yield event
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("generation", exc) from None
        finally:
            call.cancel()
