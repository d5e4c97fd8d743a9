"""A bare grpc.aio embedding server doing the service's model work and nothing else: bench/embedding_bench.py's floor.

    python -m bench._embedding_floor PORT

EmbeddingService.Embed with no interceptors, no auth, no metrics, no tracing, no validation, no cache and no batcher
(the bare shape of bench/_floor_server.py), but the model work of the real service: its tokenizer and its ONNX
session, through the same OnnxBackend built from the same settings (EmbeddingConfig.from_env(), so the
RAGFLEET_EMBEDDING_ONNX_* variables the benchmark gives the service apply here too; default compute int8, one
single-threaded run per usable CPU), on the same event loop (RAGFLEET_EVENT_LOOP, uvloop by default). Per request:
`backend.prepare(texts)` inline (the service tokenizes short texts inline too) and `await backend.embed(items)`, which
runs the texts on one of the backend's model threads (int8: each text alone), then the vectors as floats.

What the service costs beyond this server is its own (batcher, cache lookups, interceptors, metrics, spans); what
this server costs beyond the in-process ceiling is Python gRPC's and the load generator's share of the same cores.
The server starts listening only once the model is loaded and warmed, so a ready channel means ready to embed.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np

from services.embedding.backends.onnx import OnnxBackend
from services.embedding.config import EmbeddingConfig
from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc
from services.runtime.workers import arm_parent_death_signal


class FloorEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, backend: OnnxBackend) -> None:
        self.backend = backend

    async def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> embedding_pb2.EmbedResponse:
        items = self.backend.prepare(request.texts)
        vectors = await self.backend.embed(items)
        return embedding_pb2.EmbedResponse(
            model=self.backend.model_id, dimension=self.backend.dimension,
            embeddings=[embedding_pb2.Embedding(values=np.asarray(vector, dtype=np.float32).tolist(),
                                                token_count=item.token_count, truncated=item.truncated)
                        for vector, item in zip(vectors, items)])


async def serve(port: int, config: EmbeddingConfig) -> None:
    backend = OnnxBackend(config.onnx)
    await backend.start()
    server = grpc.aio.server()
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(FloorEmbedding(backend), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await backend.close()


def main(port: int) -> None:
    arm_parent_death_signal()  # started with die_with_parent(): never outlive a killed benchmark
    config = EmbeddingConfig.from_env()
    if config.server.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(port, config))
    else:
        asyncio.run(serve(port, config))


if __name__ == "__main__":
    main(int(sys.argv[1]))
