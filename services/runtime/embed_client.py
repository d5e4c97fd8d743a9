"""The one client of EmbeddingService.Embed: the gateway's query and document embeddings, retrieval's query vectors.

Every call carries a deadline. Embed is idempotent, so gRPC retries it itself through the channel's retryPolicy. A
failed call becomes a domain error naming the embedding service (``from_rpc_error``). The service and method names
come from the proto descriptors, as the servicers' do, so a renamed RPC fails at import rather than at runtime.

    client = EmbedClient(pool, "127.0.0.1:50051", timeout=2.0, dimension=384)
    reply = await client.embed(["a", "b"], input_type=common_pb2.INPUT_TYPE_DOCUMENT, timeout=5.0)
    vector = await client.embed_query("why do bees swarm?")  # float32, checked against `dimension`
"""

from __future__ import annotations

from typing import Sequence

import grpc
import numpy as np

from services.runtime.channels import ChannelPool
from services.runtime.errors import FailedPrecondition, from_rpc_error
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
_EMBED = (_SERVICE.full_name, _SERVICE.methods_by_name["Embed"].name)


class EmbedClient:
    def __init__(self, pool: ChannelPool, address: str, *, timeout: float | None = None,
                 dimension: int | None = None, dimension_setting: str = "") -> None:
        """``timeout``: the deadline of calls that name none. ``dimension``: when set, every reply must have it
        (``dimension_setting`` names the variable to fix): a model swap without re-indexing would otherwise
        silently return garbage."""
        channel = pool.get(address, health_service=_SERVICE.full_name, retry_methods=[_EMBED])
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        self.address = address
        self.timeout = timeout
        self.dimension = dimension
        self._dimension_setting = dimension_setting

    async def embed(self, texts: Sequence[str], *, input_type: int,
                    timeout: float | None = None) -> embedding_pb2.EmbedResponse:
        request = embedding_pb2.EmbedRequest(texts=list(texts), input_type=input_type)
        try:
            reply = await self._stub.Embed(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error("embedding", exc) from None
        if self.dimension is not None and (reply.dimension != self.dimension
                                           or len(reply.embeddings) != len(request.texts)):
            setting = f" ({self._dimension_setting})" if self._dimension_setting else ""
            raise FailedPrecondition(f"embedding service returned {len(reply.embeddings)} vectors of dimension "
                                     f"{reply.dimension} for {len(request.texts)} texts; expected dimension "
                                     f"{self.dimension}{setting}")
        return reply

    async def embed_query(self, text: str, *, timeout: float | None = None) -> np.ndarray:
        """One query's vector as float32."""
        reply = await self.embed([text], input_type=common_pb2.INPUT_TYPE_QUERY, timeout=timeout)
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)
