"""Retrieval service process: config -> store -> pipeline -> gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.retrieval import metrics
from services.retrieval.cache import ResultCache
from services.retrieval.config import RetrievalConfig
from services.retrieval.rerank import build_reranker
from services.retrieval.search import SearchPipeline
from services.retrieval.servicer import RetrievalServiceServicer
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store import StoreStartupError, open_store
from services.retrieval.validation import Limits
from services.runtime.channels import ChannelPool
from services.runtime.embed_client import EmbedClient
from services.runtime.errors import ConfigError
from services.runtime.guard import KiB, MiB, utf8_bytes
from services.runtime.pb.ragfleet.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.runtime.serve import Binding, bootstrap, serve

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name
log = logging.getLogger("ragfleet.retrieval")


# Room per upserted chunk besides its vector: text (a chunk of up to 512 tokens), ids, title and metadata.
CHUNK_BYTES = 16 * KiB


def request_limits(config: RetrievalConfig) -> dict[str, int]:
    """Largest legitimate request per method (defaults: Upsert ~36 MiB, Search 1 MiB, Delete 2 MiB), refused unparsed
    past it (services.runtime.guard)."""
    vector = 5 * config.index.dimension  # packed floats, with slack
    return {"Upsert": config.search.max_chunks_per_upsert * (vector + CHUNK_BYTES),
            "Search": max(1 * MiB, utf8_bytes(config.search.max_query_chars) + vector + 256 * KiB),
            "Delete": 2 * MiB}


async def build(config: RetrievalConfig):  # type: ignore[no-untyped-def]
    store = open_store(config)
    await store.start()
    pool = ChannelPool()
    embedder = None
    if config.embedding_address:
        embedder = EmbedClient(pool, config.embedding_address, timeout=config.embedding_timeout_seconds,
                               dimension=config.index.dimension, dimension_setting="RAGFLEET_RETRIEVAL_DIMENSION")
    reranker = build_reranker(config.rerank)
    encoder = Bm25Encoder(config.bm25)
    cache = ResultCache(config.cache)
    pipeline = SearchPipeline(store=store, encoder=encoder, settings=config.search, embedder=embedder,
                              reranker=reranker)
    servicer = RetrievalServiceServicer(store=store, pipeline=pipeline, cache=cache, encoder=encoder,
                                        limits=Limits(config.index.dimension, config.search),
                                        rerank_default=config.search.rerank_default)
    log.info("store ready", extra={"fields": {"store": store.name, "embedding": config.embedding_address,
                                              "reranker": config.rerank.kind}})
    status_task = asyncio.create_task(metrics.index_status_task(store, redis_url=config.cache.redis_url),
                                      name="index-status")

    async def on_stop() -> None:
        status_task.cancel()
        await pool.close()
        if reranker is not None:
            await reranker.close()
        await cache.close()
        await store.close()

    return [Binding(SERVICE_NAME, retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server, servicer,
                    max_request_bytes=request_limits(config))], on_stop


def main() -> int:
    try:
        config = RetrievalConfig.from_env()
    except ConfigError as exc:
        print(f"retrieval: configuration error: {exc}", file=sys.stderr)
        return 2
    bootstrap(config.server)
    try:
        serve(config.server, lambda: build(config))
    except (StoreStartupError, ConfigError) as exc:
        log.error("start-up failed: %s", exc)
        print(f"retrieval: start-up failed: {exc}", file=sys.stderr)
        return 3
    return 0
