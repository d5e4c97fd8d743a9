"""Retrieval service process: config -> store -> pipeline -> gRPC server."""

from __future__ import annotations

import asyncio
import logging

from services.retrieval import metrics
from services.retrieval.cache import ResultCache
from services.retrieval.config import RetrievalConfig
from services.retrieval.rerank import build_reranker
from services.retrieval.search import SearchPipeline
from services.retrieval.servicer import RetrievalServiceServicer
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store import open_store
from services.retrieval.validation import MAX_TENANT_CHARS, Limits
from services.runtime.channels import ChannelPool
from services.runtime.embed_client import EmbedClient
from services.runtime.guard import KiB, MiB, utf8_bytes
from services.runtime.limits import chunk_bytes, text_bytes
from services.runtime.pb.ragfleet.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.runtime.serve import Binding, Service, Started

SERVICE = Service(retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"], RetrievalConfig)
log = logging.getLogger("ragfleet.retrieval")


def request_limits(config: RetrievalConfig) -> dict[str, int]:
    """Largest legitimate request per method, refused unparsed past it (services.runtime.guard). An Upsert is
    MAX_CHUNKS_PER_UPSERT chunks with every field at its limit (~1.3 GiB by default, so the server's MAX_MESSAGE_MB
    is the effective bound); a Search 1 MiB, a Delete 2 MiB."""
    vector = 5 * config.index.dimension  # packed floats, with slack
    return {"Upsert": text_bytes(MAX_TENANT_CHARS) + config.search.max_chunks_per_upsert * (vector + chunk_bytes()),
            "Search": max(1 * MiB, utf8_bytes(config.search.max_query_chars) + vector + 256 * KiB),
            "Delete": 2 * MiB}


async def build(config: RetrievalConfig) -> Started:
    """Open the store, wire the search pipeline (query embedder, reranker, BM25, result cache), report index status."""
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
    # The settings every Search shares (the reranker, the fusion's k, the legs' candidate limit) are told here once,
    # not on each Search span.
    log.info("store ready", extra={"fields": {"store": store.name, "embedding": config.embedding_address,
                                              "reranker": config.rerank.kind, "rrf_k": config.search.rrf_k,
                                              "candidates": config.search.candidates,
                                              "rerank_candidates": config.search.rerank_candidates}})
    status_task = asyncio.create_task(metrics.index_status_task(store, redis_url=config.cache.redis_url),
                                      name="index-status")

    async def on_stop() -> None:
        status_task.cancel()
        await pool.close()
        if reranker is not None:
            await reranker.close()
        await cache.close()
        await store.close()

    return Started([Binding(SERVICE.full_name, retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server, servicer,
                            max_request_bytes=request_limits(config))], on_stop)
