"""RetrievalService handlers in-process on the real embedded engine: validation, writes, cache, faults."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.retrieval.cache import ResultCache
from services.retrieval.config import Bm25Config, CacheConfig, IndexConfig, SearchConfig
from services.retrieval.rerank import FusionRescorer
from services.retrieval.search import SearchPipeline
from services.retrieval.servicer import RetrievalServiceServicer
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store.base import StoreError
from services.retrieval.store.edge import EdgeStore
from services.retrieval.validation import Limits
from services.runtime.errors import InvalidArgument, Unavailable
from services.runtime.pb.ragfleet.v1 import common_pb2, retrieval_pb2 as pb

from .conftest import DIM, unit

SETTINGS = SearchConfig(max_top_k=20, filter_fields=("lang", "year"))


async def make_servicer(path: str, settings: SearchConfig) -> RetrievalServiceServicer:
    store = EdgeStore(path=path, index=IndexConfig(dimension=DIM, optimize_idle_seconds=0))
    await store.start()
    encoder = Bm25Encoder(Bm25Config())
    pipeline = SearchPipeline(store=store, encoder=encoder, settings=settings, reranker=FusionRescorer(0.7))
    return RetrievalServiceServicer(store=store, pipeline=pipeline, cache=ResultCache(CacheConfig(size=64)),
                                    encoder=encoder, limits=Limits(DIM, settings), rerank_default=True)


@pytest.fixture
async def servicer(tmp_path):
    svc = await make_servicer(str(tmp_path / "shard"), SETTINGS)
    yield svc
    await svc.store.close()


@pytest.fixture
async def any_field_servicer(tmp_path):
    """Filters may name any metadata key (RAGFLEET_RETRIEVAL_FILTER_FIELDS=*, the default)."""
    svc = await make_servicer(str(tmp_path / "shard"), SearchConfig(max_top_k=20))
    yield svc
    await svc.store.close()


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
    (dict(tenant="a", query_text="x", top_k=3, filters=[common_pb2.FieldCondition(field="year", gte=float("nan"))]),
     "filters[0].gte: must be a number, got NaN"),
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


async def test_stage_attributes_and_metrics_carry_candidate_counts(servicer, span_exporter):
    from opentelemetry import trace
    from prometheus_client import REGISTRY

    exporter = span_exporter

    def count(stage: str) -> float:
        return REGISTRY.get_sample_value("ragfleet_retrieval_stage_seconds_count", {"stage": stage}) or 0.0

    before = {s: count(s) for s in ("dense", "sparse", "fusion", "rerank", "mmr")}
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d", ["bees make honey", "bees dance",
                                                                              "wasps sting"])), None)
    with trace.get_tracer("test").start_as_current_span("/ragfleet.v1.RetrievalService/Search"):  # the RPC's span
        await search(servicer, query_text="bees", query_vector=unit(np.random.default_rng(5)), mmr_lambda=0.5,
                     top_k=2)
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith(("retrieval.", "/ragfleet"))]
    assert [s.name for s in spans] == ["/ragfleet.v1.RetrievalService/Search"], "stages are attributes, not spans"
    stages = spans[0].attributes
    assert stages["ragfleet.stage.dense.candidates_out"] == 3
    assert "ragfleet.stage.dense.limit" not in stages  # config and top_k give it: logged at start, not per Search
    assert stages["ragfleet.stage.sparse.candidates_out"] == 2  # only 'bees' chunks match
    assert stages["ragfleet.stage.fusion.candidates_out"] == 3
    assert stages["ragfleet.stage.mmr.candidates_in"] == 3
    assert stages["ragfleet.stage.mmr.candidates_out"] == 2
    assert all(stages[f"ragfleet.stage.{s}_ms"] >= 0 for s in before)
    assert all(count(s) == before[s] + 1 for s in before)


@pytest.mark.parametrize("name", ["a b", "dc:title", "a/b", "a,b", "$", "a.b", "a[]", "a[0]", 'a"', "x\u0301"])
async def test_a_filter_field_that_is_no_valid_key_is_invalid_argument(any_field_servicer, name):
    with pytest.raises(InvalidArgument) as err:
        await search(any_field_servicer, query_text="x",
                     filters=[common_pb2.FieldCondition(field="lang", any_of=["en"]),
                              common_pb2.FieldCondition(field=name, any_of=["x"])])
    assert f"filters[1].field: {name!r} cannot be filtered on" in err.value.message
    assert "only letters, digits, '_' and '-'" in err.value.message


async def test_filter_fields_in_any_script_with_hyphens_and_digits_work(any_field_servicer):
    metadata = {"first-name": "ada", "ünicode": "ja", "1abc": "z", "名前": "x"}
    await any_field_servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("d", ["bees"], **metadata)), None)
    await any_field_servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("other", ["bees"], seed=1)), None)
    for name, value in metadata.items():
        reply = await search(any_field_servicer, query_text="bees",
                             filters=[common_pb2.FieldCondition(field=name, any_of=[value])])
        assert [h.doc_id for h in reply.hits] == ["d"], name


async def test_non_finite_numeric_metadata_is_stored_as_text(servicer):
    """"nan", "inf" and "1e999" parse as floats but no engine stores them: they stay text (no range copy) instead of
    failing the write with INTERNAL after earlier batches were written."""
    values = ["nan", "inf", "-inf", "1e999", "2021"]
    many = [pb.Chunk(doc_id=f"d{i}", chunk_index=0, text="bees", vector=unit(np.random.default_rng(i)),
                     metadata={"year": value}) for i, value in enumerate(values)]
    many += chunks("bulk", ["bees"] * 295, seed=9)  # more than one write batch, the odd values in the second
    reply = await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=many[5:] + many[:5]), None)
    assert reply.upserted == 300 and not reply.failed_chunk_ids
    recent = await search(servicer, query_text="bees", filters=[common_pb2.FieldCondition(field="year", gte=2000)])
    assert [h.doc_id for h in recent.hits] == ["d4"]
    nan = await search(servicer, query_text="bees", filters=[common_pb2.FieldCondition(field="year", any_of=["nan"])])
    assert [(h.doc_id, h.metadata["year"]) for h in nan.hits] == [("d0", "nan")]


async def test_a_write_whose_delete_step_fails_still_invalidates_the_cache(servicer):
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("old", ["zebra crossing"])), None)
    assert not (await search(servicer, query_text="zebra")).cached
    assert (await search(servicer, query_text="zebra")).cached
    real_delete = servicer.store.delete_documents

    async def failing_delete(*args, **kwargs):
        raise StoreError("engine hiccup")

    servicer.store.delete_documents = failing_delete
    with pytest.raises(Unavailable, match="new chunks were written but stale ones were not removed"):
        await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=chunks("new", ["zebra stripes"], seed=1),
                                               replace_documents=True), None)
    after = await search(servicer, query_text="zebra")
    assert not after.cached and {h.doc_id for h in after.hits} == {"old", "new"}

    async def half_done_delete(tenant, doc_ids, keep_point_ids=()):
        await real_delete(tenant, doc_ids, keep_point_ids)  # the points are gone, then the call fails
        raise StoreError("connection reset after the delete")

    assert (await search(servicer, query_text="zebra")).cached
    servicer.store.delete_documents = half_done_delete
    with pytest.raises(Unavailable):
        await servicer.Delete(pb.DeleteRequest(tenant="acme", doc_ids=["old"]), None)
    after_delete = await search(servicer, query_text="zebra")
    assert not after_delete.cached and [h.doc_id for h in after_delete.hits] == ["new"]
