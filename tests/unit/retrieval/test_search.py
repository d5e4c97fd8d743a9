"""Search pipeline semantics on the real embedded engine: rerank depth, fetch after deletion, mode fallback."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.config import IndexConfig, SearchConfig
from services.retrieval.rerank import FusionRescorer, Reranker, RerankQuery
from services.retrieval.search import SearchPipeline, SearchQuery
from services.retrieval.store.edge import EdgeStore

from .conftest import DIM, make_record, unit


class Reverse(Reranker):
    """A reranker whose effect is unmistakable: it reverses whatever it is given."""

    name = "reverse"

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def scores(self, query: RerankQuery, candidates):
        self.seen.append(len(candidates))
        return [float(i) for i in range(len(candidates))]


@pytest.fixture
async def store(tmp_path, encoder):
    s = EdgeStore(path=str(tmp_path / "s"), index=IndexConfig(dimension=DIM, optimize_idle_seconds=0))
    await s.start()
    # BM25 order is fixed by term frequency: doc0 mentions "bee" 5 times, doc4 once.
    await s.upsert([make_record(encoder, "acme", f"doc{i}", 0, " ".join(["bee"] * (5 - i) + ["filler"] * 3),
                                unit(np.random.default_rng(i))) for i in range(5)])
    yield s
    await s.close()


async def test_rerank_depth_reorders_only_the_top_and_keeps_the_tail(store, encoder):
    reranker = Reverse()
    pipeline = SearchPipeline(store=store, encoder=encoder, reranker=reranker,
                              settings=SearchConfig(rerank_candidates=3))
    out = await pipeline.run(SearchQuery("acme", "bee", None, top_k=5, mode="sparse"))
    assert [h.payload["doc_id"] for h in out.hits] == ["doc2", "doc1", "doc0", "doc3", "doc4"]
    assert reranker.seen == [3]
    plain = await pipeline.run(SearchQuery("acme", "bee", None, top_k=5, mode="sparse", rerank=False))
    assert [h.payload["doc_id"] for h in plain.hits] == ["doc0", "doc1", "doc2", "doc3", "doc4"]
    assert "rerank" not in plain.timings_ms and reranker.seen == [3]


async def test_top_k_cuts_after_every_stage(store, encoder):
    pipeline = SearchPipeline(store=store, encoder=encoder, settings=SearchConfig(), reranker=None)
    out = await pipeline.run(SearchQuery("acme", "bee", np.asarray(unit(np.random.default_rng(0))), top_k=2,
                                         mmr_lambda=0.5))
    assert len(out.hits) == 2 and out.mode == "hybrid"
    assert {"dense", "sparse", "fusion", "fetch", "mmr"} <= set(out.timings_ms)
    assert all(h.payload["tenant"] == "acme" and h.vector is not None for h in out.hits)


async def test_fusion_rerank_fetches_vectors_only_for_candidates_the_dense_leg_missed(store, encoder):
    fetched: list[tuple[tuple[str, ...], bool]] = []
    fetch = store.fetch

    async def counting_fetch(tenant, point_ids, *, with_vectors):
        fetched.append((tuple(point_ids), with_vectors))
        return await fetch(tenant, point_ids, with_vectors=with_vectors)

    store.fetch = counting_fetch
    query_vector = np.asarray(unit(np.random.default_rng(3)))
    # Each leg keeps 2 candidates, so the fused pool holds points only the sparse leg found.
    pipeline = SearchPipeline(store=store, encoder=encoder, reranker=FusionRescorer(0.5),
                              settings=SearchConfig(candidates=2, rerank_candidates=5))
    out = await pipeline.run(SearchQuery("acme", "bee", query_vector, top_k=2))
    assert len(out.hits) == 2 and "rerank" in out.timings_ms
    dense_ids = {c.point_id for c in await store.dense("acme", query_vector, 2, ())}
    (pool, first_with_vectors), (vector_ids, second_with_vectors) = fetched
    assert not first_with_vectors and second_with_vectors
    assert set(vector_ids) == set(pool) - dense_ids and vector_ids  # only the sparse-only candidates, and some exist
    # The premise: the dense leg's score is the cosine of the stored vector, so mixing the two ranks as before.
    stored = await fetch("acme", sorted(dense_ids), with_vectors=True)
    for hit in await store.dense("acme", query_vector, 2, ()):
        assert hit.score == pytest.approx(float(stored[hit.point_id].vector @ query_vector), abs=1e-5)

    fetched.clear()  # dense only: every candidate has its cosine already, no vector leaves the engine
    await pipeline.run(SearchQuery("acme", "bee", query_vector, top_k=2, mode="dense"))
    assert [with_vectors for _, with_vectors in fetched] == [False]
