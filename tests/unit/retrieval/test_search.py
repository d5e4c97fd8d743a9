"""Search pipeline semantics on the real embedded engine: rerank depth, fetch after deletion, mode fallback."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.config import IndexConfig, SearchSettings
from services.retrieval.rerank import Reranker, RerankQuery
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
                              settings=SearchSettings(rerank_candidates=3))
    out = await pipeline.run(SearchQuery("acme", "bee", None, top_k=5, mode="sparse"))
    assert [h.payload["doc_id"] for h in out.hits] == ["doc2", "doc1", "doc0", "doc3", "doc4"]
    assert reranker.seen == [3]
    plain = await pipeline.run(SearchQuery("acme", "bee", None, top_k=5, mode="sparse", rerank=False))
    assert [h.payload["doc_id"] for h in plain.hits] == ["doc0", "doc1", "doc2", "doc3", "doc4"]
    assert "rerank" not in plain.timings_ms and reranker.seen == [3]


async def test_top_k_cuts_after_every_stage(store, encoder):
    pipeline = SearchPipeline(store=store, encoder=encoder, settings=SearchSettings(), reranker=None)
    out = await pipeline.run(SearchQuery("acme", "bee", np.asarray(unit(np.random.default_rng(0))), top_k=2,
                                         mmr_lambda=0.5))
    assert len(out.hits) == 2 and out.mode == "hybrid"
    assert {"dense", "sparse", "fusion", "fetch", "mmr"} <= set(out.timings_ms)
    assert all(h.payload["tenant"] == "acme" and h.vector is not None for h in out.hits)
