"""Embedding service process: config -> backend, batcher, caches -> gRPC server."""

from __future__ import annotations

from services.embedding.backends import build_backend
from services.embedding.batcher import Batcher
from services.embedding.cache import L1Cache, build_l2
from services.embedding.config import EmbeddingConfig
from services.embedding.embedder import Embedder
from services.embedding.servicer import EmbeddingServiceServicer
from services.runtime.guard import utf8_bytes
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc
from services.runtime.serve import Binding, Service, Started

SERVICE = Service(embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"], EmbeddingConfig)


def request_limits(config: EmbeddingConfig) -> dict[str, int]:
    """Largest legitimate Embed: MAX_TEXTS texts of MAX_TEXT_CHARS (the defaults allow ~98 MiB, so the server's
    MAX_MESSAGE_MB is the effective bound)."""
    return {"Embed": config.max_texts * (utf8_bytes(config.max_text_chars) + 8) + 64}


async def build(config: EmbeddingConfig) -> Started:
    """Load the backend, start the batcher, connect the caches, prewarm."""
    backend = build_backend(config)
    await backend.start()
    batcher = Batcher(backend, config.batcher)
    batcher.start()
    l1 = L1Cache(config.cache.l1_max_bytes, config.cache.l1_ttl_seconds) if config.cache.l1_max_bytes else None
    embedder = Embedder(backend, batcher, l1, build_l2(config.cache, backend.dimension), truncate=config.truncate)
    if config.prewarm_file:
        await embedder.prewarm(config.prewarm_file, common_pb2.INPUT_TYPE_QUERY)
    servicer = EmbeddingServiceServicer(embedder, max_texts=config.max_texts, max_text_chars=config.max_text_chars)
    return Started([Binding(SERVICE.full_name, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, servicer,
                            max_request_bytes=request_limits(config))], embedder.close)
