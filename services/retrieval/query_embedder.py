"""Embeds query texts through the embedding service (one pooled channel, a deadline on every call)."""

from __future__ import annotations

import grpc
import numpy as np

from services.runtime.channels import ChannelPool
from services.runtime.errors import FailedPrecondition, from_rpc_error
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

_RETRY = [("ragfleet.v1.EmbeddingService", "Embed")]


class QueryEmbedder:
    def __init__(self, pool: ChannelPool, address: str, *, timeout_seconds: float, dimension: int) -> None:
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(pool.get(address, health_service=_RETRY[0][0],
                                                                      retry_methods=_RETRY))
        self.address = address
        self.timeout_seconds = timeout_seconds
        self.dimension = dimension

    async def embed(self, text: str) -> np.ndarray:
        request = embedding_pb2.EmbedRequest(texts=[text], input_type=common_pb2.INPUT_TYPE_QUERY)
        try:
            reply = await self._stub.Embed(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("embedding", exc) from exc
        if reply.dimension != self.dimension or len(reply.embeddings) != 1:
            # A model swap without re-indexing would silently return garbage; refuse instead.
            raise FailedPrecondition(f"embedding service returned dimension {reply.dimension}, retrieval is "
                                     f"configured for {self.dimension} (RAGFLEET_RETRIEVAL_DIMENSION)")
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)
