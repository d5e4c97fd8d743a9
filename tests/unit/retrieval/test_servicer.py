"""RetrievalService handlers in-process on the real embedded engine: validation, writes, cache, faults."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.retrieval.cache import ResultCache
from services.retrieval.config import Bm25Settings, CacheSettings, IndexConfig, SearchSettings
from services.retrieval.rerank import FusionRescorer
from services.retrieval.search import SearchPipeline
from services.retrieval.servicer import RetrievalServiceServicer
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store.edge import EdgeStore
from services.retrieval.validation import Limits
from services.runtime.errors import InvalidArgument, Unavailable
from services.runtime.pb.ragfleet.v1 import common_pb2, retrieval_pb2 as pb

from .conftest import DIM, unit

SETTINGS = SearchSettings(max_top_k=20, filter_fields=("lang", "year"))


@pytest.fixture
async def servicer(tmp_path):
    store = EdgeStore(path=str(tmp_path / "shard"), index=IndexConfig(dimension=DIM, optimize_idle_seconds=0))
    await store.start()
    encoder = Bm25Encoder(Bm25Settings())
    pipeline = SearchPipeline(store=store, encoder=encoder, settings=SETTINGS, reranker=FusionRescorer(0.7))
    svc = RetrievalServiceServicer(store=store, pipeline=pipeline, cache=ResultCache(CacheSettings(size=64)),
                                   encoder=encoder, limits=Limits(DIM, SETTINGS), rerank_default=True)
    yield svc
    await store.close()


def chunks(doc_id: str, texts: list[str], seed: int = 0, **metadata: str) -> list[pb.Chunk]:
    rng = np.random.default_rng(seed)
    return [pb.Chunk(doc_id=doc_id, chunk_index=i, text=t, title=f"{doc_id} title", vector=unit(rng),
                     metadata=metadata) for i, t in enumerate(texts)]


async def search(svc, **kwargs) -> pb.SearchResponse:
    kwargs.setdefault("tenant", "acme")
    kwargs.setdefault("top_k", 10)
    return await svc.Search(pb.SearchRequest(**kwargs), None)


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(tenant="", query_text="x", top_k=3), "tenant: required"),
    (dict(tenant="a", query_text="x", top_k=0), "top_k: must be between 1 and 20"),
    (dict(tenant="a", query_text="x", top_k=21), "top_k: must be between 1 and 20"),
    (dict(tenant="a", top_k=3), "query_text, query_vector: at least one is required"),
    (dict(tenant="a", query_vector=[0.1] * (DIM + 1), top_k=3), f"query_vector: has {DIM + 1} values, expected {DIM}"),
    (dict(tenant="a", query_text="x", top_k=3, filters=[common_pb2.FieldCondition(field="color", any_of=["red"])]),
     "filters[0].field: unknown filter field 'color'"),
    (dict(tenant="a", query_text="x", top_k=3, filters=[common_pb2.FieldCondition(field="tenant", any_of=["b"])]),
     "unknown filter field 'tenant'"),
    (dict(tenant="a", query_text="x", top_k=3, mmr_lambda=1.5), "mmr_lambda: must be in [0, 1]"),
    (dict(tenant="a", query_text="x", top_k=3, mode=common_pb2.SEARCH_MODE_DENSE),
     "query_vector: required for mode DENSE"),
    (dict(tenant="a", query_vector=[0.1] * DIM, top_k=3, mode=common_pb2.SEARCH_MODE_SPARSE),
     "query_text: required for mode SPARSE"),
])
async def test_search_bad_input(servicer, request_kwargs, message):
    with pytest.raises(InvalidArgument) as err:
        await servicer.Search(pb.SearchRequest(**request_kwargs), None)
    assert message in err.value.message


@pytest.mark.parametrize("request_kwargs, message", [
    (dict(tenant="", chunks=chunks("d", ["x"])), "tenant: required"),
    (dict(tenant="a"), "chunks: at least one chunk"),
    (dict(tenant="a", chunks=[pb.Chunk(doc_id="d", text="x", vector=[1.0] * 3)]),
     f"chunks[0].vector: has 3 values, expected {DIM}"),
    (dict(tenant="a", chunks=[pb.Chunk(text="x", vector=[1.0] * DIM)]), "chunks[0].doc_id: required"),
    (dict(tenant="a", chunks=chunks("d", ["x"]) + chunks("d", ["y"])), "chunks[1]: duplicate"),
    (dict(tenant="a", chunks=[pb.Chunk(doc_id="d", text="x", vector=[float("nan")] * DIM)]), "NaN"),
])
async def test_upsert_bad_input(servicer, request_kwargs, message):
    with pytest.raises(InvalidArgument) as err:
        await servicer.Upsert(pb.UpsertRequest(**request_kwargs), None)
    assert message in err.value.message


async def test_reingest_with_fewer_chunks_replaces_old_ones(servicer):
    reply = await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("doc", ["alpha one", "beta two",
                                                                                       "gamma three"]),
                                                   replace_documents=True), None)
    assert reply.upserted == 3 and reply.corpus_version == 1 and not reply.failed_chunk_ids
    reply = await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("doc", ["alpha updated"], seed=1),
                                                   replace_documents=True), None)
    assert reply.upserted == 1 and reply.corpus_version == 2
    hits = (await search(servicer, query_text="alpha beta gamma updated", bypass_cache=True)).hits
    assert [(h.chunk_id, h.text) for h in hits] == [("doc#0", "alpha updated")]


async def test_no_stale_cache_after_write_and_delete(servicer):
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d1", ["solar panels"])), None)
    first = await search(servicer, query_text="solar wind")
    assert not first.cached and [h.doc_id for h in first.hits] == ["d1"]
    again = await search(servicer, query_text="solar wind")
    assert again.cached and list(again.hits) == list(first.hits)
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d2", ["wind turbines"], seed=2)), None)
    after_write = await search(servicer, query_text="solar wind")
    assert not after_write.cached and {h.doc_id for h in after_write.hits} == {"d1", "d2"}
    deleted = await servicer.Delete(pb.DeleteRequest(tenant="acme", doc_ids=["d1"]), None)
    assert deleted.deleted_chunks == 1 and deleted.corpus_version == 3
    after_delete = await search(servicer, query_text="solar wind")
    assert [h.doc_id for h in after_delete.hits] == ["d2"] and after_delete.corpus_version == 3


async def test_filters_mmr_and_token_budget(servicer):
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("en", ["bees make honey", "bees dance"],
                                                                        lang="en", year="2020")), None)
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("de", ["bees summen"], seed=4, lang="de",
                                                                        year="2010")), None)
    only_de = await search(servicer, query_text="bees", filters=[common_pb2.FieldCondition(field="lang",
                                                                                            any_of=["de"])])
    assert [h.doc_id for h in only_de.hits] == ["de"] and only_de.hits[0].metadata["lang"] == "de"
    recent = await search(servicer, query_text="bees", filters=[common_pb2.FieldCondition(field="year", gte=2015)])
    assert {h.doc_id for h in recent.hits} == {"en"}
    cut = await search(servicer, query_text="bees", max_context_tokens=3)
    assert len(cut.hits) == 1
    diverse = await search(servicer, query_text="bees", query_vector=unit(np.random.default_rng(0)), mmr_lambda=0.3,
                           top_k=2)
    assert len(diverse.hits) == 2 and set(diverse.timings_ms) >= {"dense", "sparse", "fusion", "rerank", "mmr"}


async def test_text_only_without_embedder_runs_bm25(servicer):
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d", ["photosynthesis in leaves"])), None)
    reply = await search(servicer, query_text="leaves")
    assert [h.doc_id for h in reply.hits] == ["d"] and "dense" not in reply.timings_ms


async def test_engine_failure_is_unavailable_with_cause(servicer):
    servicer.store.shard.close()  # the engine goes away underneath a running service
    with pytest.raises(Unavailable, match="retrieval store: embedded engine failed to search: .+"):
        await search(servicer, query_text="anything", bypass_cache=True)
    with pytest.raises(Unavailable, match="nothing was written"):
        await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d", ["x"])), None)


def test_limits_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SETTINGS.max_top_k = 5  # type: ignore[misc]


async def test_stage_spans_and_metrics_carry_candidate_counts(servicer):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import REGISTRY

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def count(stage: str) -> float:
        return REGISTRY.get_sample_value("ragfleet_retrieval_stage_seconds_count", {"stage": stage}) or 0.0

    before = {s: count(s) for s in ("dense", "sparse", "fusion", "rerank", "mmr")}
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d", ["bees make honey", "bees dance",
                                                                              "wasps sting"])), None)
    await search(servicer, query_text="bees", query_vector=unit(np.random.default_rng(5)), mmr_lambda=0.5, top_k=2)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"retrieval.dense", "retrieval.sparse", "retrieval.fusion", "retrieval.rerank", "retrieval.mmr"} <= set(spans)
    assert spans["retrieval.dense"].attributes["ragfleet.candidates_out"] == 3
    assert spans["retrieval.sparse"].attributes["ragfleet.candidates_out"] == 2  # only 'bees' chunks match
    assert spans["retrieval.fusion"].attributes["ragfleet.candidates_out"] == 3
    assert spans["retrieval.mmr"].attributes["ragfleet.candidates_in"] == 3
    assert spans["retrieval.mmr"].attributes["ragfleet.candidates_out"] == 2
    assert all(count(s) == before[s] + 1 for s in before)
