"""Entry point of the embedding service: `python -m services.embedding` or `ragfleet serve embedding`."""

from __future__ import annotations

import logging

from services.embedding.backends import build_backend
from services.embedding.batcher import Batcher
from services.embedding.cache import L1Cache, build_l2
from services.embedding.config import EmbeddingConfig
from services.embedding.embedder import Embedder
from services.embedding.servicer import SERVICE_NAME, EmbeddingServiceServicer
from services.runtime.config import ServerConfig
from services.runtime.errors import ConfigError
from services.runtime.guard import utf8_bytes
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2_grpc
from services.runtime.serve import Binding, bootstrap, serve

log = logging.getLogger("ragfleet.embedding")


async def build_embedder(config: EmbeddingConfig) -> Embedder:
    """Load the backend, start the batcher, connect the caches (shared by the server, tests and the benchmark)."""
    backend = build_backend(config)
    await backend.start()
    batcher = Batcher(backend, config.effective_batcher)
    batcher.start()
    l1 = L1Cache(config.cache.l1_max_bytes, config.cache.l1_ttl_seconds) if config.cache.l1_max_bytes else None
    embedder = Embedder(backend, batcher, l1, build_l2(config.cache, backend.dimension), truncate=config.truncate)
    if config.prewarm_file:
        await embedder.prewarm(config.prewarm_file, common_pb2.INPUT_TYPE_QUERY)
    return embedder


def request_limits(config: EmbeddingConfig) -> dict[str, int]:
    """Largest legitimate Embed: MAX_TEXTS texts of MAX_TEXT_CHARS (the defaults allow ~98 MiB, so the server's
    MAX_MESSAGE_MB is the effective bound)."""
    return {"Embed": config.max_texts * (utf8_bytes(config.max_text_chars) + 8) + 64}


def main() -> int:
    try:
        config = EmbeddingConfig.from_env()
    except ConfigError as exc:
        bootstrap(ServerConfig(component="embedding", log_format="text"))
        log.error("bad configuration: %s", exc)
        return 2
    bootstrap(config.server)

    async def build():
        embedder = await build_embedder(config)
        servicer = EmbeddingServiceServicer(embedder, max_texts=config.max_texts,
                                            max_text_chars=config.max_text_chars)
        binding = Binding(SERVICE_NAME, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, servicer,
                          max_request_bytes=request_limits(config))
        return [binding], embedder.close

    serve(config.server, build)
    return 0
