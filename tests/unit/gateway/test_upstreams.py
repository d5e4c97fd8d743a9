"""Upstream clients' channel wiring: which methods gRPC may retry (idempotent unary calls only, never the Generate
stream) and client-side health checking for every upstream."""

from __future__ import annotations

from typing import Sequence

import grpc
from google.protobuf import descriptor_pool

from services.gateway.upstreams import GenerationClient, RetrievalClient
from services.runtime.channels import ChannelPool
from services.runtime.embed_client import EmbedClient

# Nothing listens on these, and channels connect lazily: nothing is dialled.
EMBEDDING, RETRIEVAL, GENERATION = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"


class RecordingPool(ChannelPool):
    """The real pool (real channels), noting what each target's channel was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.health: dict[str, str | None] = {}
        self.retries: dict[str, list[tuple[str, str]]] = {}

    def get(self, target: str, *, health_service: str | None = None,
            retry_methods: Sequence[tuple[str, str]] = ()) -> grpc.aio.Channel:
        self.health[target] = health_service
        self.retries[target] = sorted(retry_methods)
        return super().get(target, health_service=health_service, retry_methods=retry_methods)


async def test_only_idempotent_unary_methods_are_retried_and_every_upstream_is_health_checked():
    pool = RecordingPool()
    try:
        EmbedClient(pool, EMBEDDING)
        RetrievalClient(pool, RETRIEVAL)
        GenerationClient(pool, GENERATION)
    finally:
        await pool.close()
    assert pool.retries == {
        EMBEDDING: [("ragfleet.v1.EmbeddingService", "Embed")],
        RETRIEVAL: [("ragfleet.v1.RetrievalService", "Delete"), ("ragfleet.v1.RetrievalService", "Search"),
                    ("ragfleet.v1.RetrievalService", "Upsert")],
        GENERATION: [],  # a started stream is never replayed
    }
    assert pool.health == {EMBEDDING: "ragfleet.v1.EmbeddingService", RETRIEVAL: "ragfleet.v1.RetrievalService",
                           GENERATION: "ragfleet.v1.GenerationService"}
    for service, method in (m for methods in pool.retries.values() for m in methods):
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
        assert not (found.client_streaming or found.server_streaming), f"{service}/{method} must be unary"
