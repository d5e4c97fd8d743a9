"""gRPC clients for the three upstream services, one class each, over the process-wide ChannelPool.

Every call carries a deadline. Idempotent unary methods (Embed, Search, Upsert, Delete) are retried by gRPC itself
through the channel's retryPolicy; Generate is a stream and is never listed, so a started stream is never replayed.
A failed call becomes a domain error naming the service (``from_rpc_error``), so "generation service: ..." reaches
the client instead of an anonymous UNAVAILABLE.
"""

from __future__ import annotations

from typing import AsyncIterator, Sequence

import grpc

from services.runtime.channels import ChannelPool
from services.runtime.errors import from_rpc_error
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2,
                                             generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc)

_EMBEDDING = "ragfleet.v1.EmbeddingService"
_RETRIEVAL = "ragfleet.v1.RetrievalService"
_GENERATION = "ragfleet.v1.GenerationService"


class EmbeddingClient:
    def __init__(self, pool: ChannelPool, address: str) -> None:
        channel = pool.get(address, health_service=_EMBEDDING, retry_methods=[(_EMBEDDING, "Embed")])
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

    async def embed(self, texts: Sequence[str], *, input_type: int, timeout: float) -> embedding_pb2.EmbedResponse:
        try:
            return await self._stub.Embed(embedding_pb2.EmbedRequest(texts=list(texts), input_type=input_type),
                                          timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("embedding", exc) from None

    async def embed_query(self, text: str, *, timeout: float) -> list[float]:
        response = await self.embed([text], input_type=common_pb2.INPUT_TYPE_QUERY, timeout=timeout)
        return list(response.embeddings[0].values)


class RetrievalClient:
    def __init__(self, pool: ChannelPool, address: str) -> None:
        channel = pool.get(address, health_service=_RETRIEVAL,
                           retry_methods=[(_RETRIEVAL, "Search"), (_RETRIEVAL, "Upsert"), (_RETRIEVAL, "Delete")])
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
        self._stub = generation_pb2_grpc.GenerationServiceStub(pool.get(address, health_service=_GENERATION))

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
