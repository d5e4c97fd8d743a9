"""A bare grpc.aio server (no interceptors, no work) for the transport floor in bench/gateway_bench.py.

    python -m bench._floor_server PORT

Embed answers one fixed 384-d vector per text; Ask streams a Sources event, one delta and a final event, the
shape of a cached answer. What a real hop costs beyond these is ours; these are Python gRPC's own cost here.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, gateway_pb2,
                                             gateway_pb2_grpc)

_VECTOR = [0.05] * 384
_SOURCES = gateway_pb2.Sources(passages=[common_pb2.Passage(number=i, chunk_id=f"c{i}", doc_id="d", text="x" * 600)
                                         for i in range(1, 6)])


class FloorEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    async def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> embedding_pb2.EmbedResponse:
        return embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=_VECTOR) for _ in request.texts])


class FloorGateway(gateway_pb2_grpc.GatewayServiceServicer):
    async def Ask(self, request: gateway_pb2.AskRequest, context: grpc.aio.ServicerContext):  # type: ignore[override]
        yield gateway_pb2.AskResponse(sources=_SOURCES)
        yield gateway_pb2.AskResponse(delta=common_pb2.TextDelta(text="y" * 400))
        yield gateway_pb2.AskResponse(finished=gateway_pb2.AskFinished())


async def serve(port: int) -> None:
    server = grpc.aio.server()
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(FloorEmbedding(), server)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(FloorGateway(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
