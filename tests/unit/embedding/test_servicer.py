"""What an Embed RPC reports: the attributes of its span and the service's Prometheus metrics, through a real gRPC
server with the OpenTelemetry interceptor, the real ONNX model and the real Redis L2."""

from __future__ import annotations

import time

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from services.embedding.batcher import Batcher
from services.embedding.cache import L1Cache, L2Cache
from services.embedding.config import BatcherConfig
from services.embedding.embedder import Embedder
from services.embedding.servicer import EmbeddingServiceServicer
from services.runtime.pb.ragfleet.v1 import embedding_pb2 as pb, embedding_pb2_grpc
from tests.conftest import REDIS_URL

LONG = "word " * 300  # 302 tokens: cut to the model's 256
ATTRIBUTE = "ragfleet.embedding."


@pytest.fixture
async def served(float32_backend, redis_cleanup):
    """An EmbeddingService on a free port whose RPC spans go to an in-memory exporter (no global provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    batcher = Batcher(float32_backend, BatcherConfig())
    batcher.start()
    l2 = L2Cache(REDIS_URL, prefix=redis_cleanup, ttl_seconds=60, timeout=0.5, dimension=float32_backend.dimension)
    embedder = Embedder(float32_backend, batcher, L1Cache(1 << 22, 60), l2)
    server = grpc.aio.server(interceptors=[aio_server_interceptor(tracer_provider=provider)])
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingServiceServicer(embedder, max_texts=256, max_text_chars=100_000), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield embedding_pb2_grpc.EmbeddingServiceStub(channel), embedder, exporter
    finally:
        await channel.close()
        await server.stop(None)
        await batcher.close()  # not embedder.close(): the ONNX backend is shared by the session
        await l2.close()
        provider.shutdown()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_embed_span_carries_batch_size_cache_hits_and_queue_wait(served):
    stub, embedder, exporter = served
    started = time.perf_counter()
    await stub.Embed(pb.EmbedRequest(texts=["alpha query", "beta query", LONG]), timeout=30)
    elapsed_ms = (time.perf_counter() - started) * 1000
    await stub.Embed(pb.EmbedRequest(texts=["alpha query"]), timeout=30)
    embedder.l1.clear()  # as on another replica: the next hit comes from Redis
    await stub.Embed(pb.EmbedRequest(texts=["beta query", "gamma query"]), timeout=30)

    spans = [s for s in exporter.get_finished_spans() if s.name == "/ragfleet.v1.EmbeddingService/Embed"]
    computed, l1_hit, l2_hit = ({k.removeprefix(ATTRIBUTE): v for k, v in s.attributes.items()
                                 if k.startswith(ATTRIBUTE)} for s in spans)
    # The two 4-token queries share a batch; the 256-token text is too long to join them and waits its turn.
    # Counts that are zero are left out (absent means 0), and so are the batch figures of a request that computed
    # nothing: each attribute costs every span to record and export.
    assert {k: computed[k] for k in computed if k != "queue_wait_ms"} == {"texts": 3, "computed": 3, "batch_size": 2}
    assert 0 < computed["queue_wait_ms"] < elapsed_ms
    assert l1_hit == {"texts": 1, "cache_hits_l1": 1}
    assert {k: l2_hit[k] for k in l2_hit if k != "queue_wait_ms"} == {"texts": 2, "cache_hits_l2": 1, "computed": 1,
                                                                      "batch_size": 1}
    assert l2_hit["queue_wait_ms"] >= 0


async def test_embed_counts_requests_texts_batches_cache_levels_and_truncation(served):
    stub, embedder, _ = served
    names = {
        "requests": ("ragfleet_embedding_requests_total", {"backend": "OnnxBackend"}),
        "texts": ("ragfleet_embedding_texts_total", {"backend": "OnnxBackend"}),
        "queue_waits": ("ragfleet_embedding_queue_wait_seconds_count", {}),
        "batches": ("ragfleet_embedding_model_seconds_count", {}),
        "l1_hits": ("ragfleet_embedding_cache_hits_total", {"level": "l1"}),
        "l1_misses": ("ragfleet_embedding_cache_misses_total", {"level": "l1"}),
        "l2_hits": ("ragfleet_embedding_cache_hits_total", {"level": "l2"}),
        "l2_misses": ("ragfleet_embedding_cache_misses_total", {"level": "l2"}),
        "truncated": ("ragfleet_embedding_truncated_total", {}),
    }
    before = {key: sample(name, **labels) for key, (name, labels) in names.items()}
    await stub.Embed(pb.EmbedRequest(texts=["alpha query", "beta query", LONG]), timeout=30)  # 3 computed, 2 batches
    await stub.Embed(pb.EmbedRequest(texts=["alpha query", LONG]), timeout=30)  # 2 L1 hits
    embedder.l1.clear()
    await stub.Embed(pb.EmbedRequest(texts=["beta query", "gamma query"]), timeout=30)  # 1 L2 hit, 1 computed
    delta = {key: sample(name, **labels) - before[key] for key, (name, labels) in names.items()}
    assert delta == {"requests": 3, "texts": 7, "queue_waits": 4, "batches": 3, "l1_hits": 2, "l1_misses": 5,
                     "l2_hits": 1, "l2_misses": 4, "truncated": 1}
