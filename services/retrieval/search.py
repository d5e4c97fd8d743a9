"""The search pipeline: embed (if needed) -> dense + sparse legs concurrently -> RRF -> rerank -> MMR -> cut.

Each stage gets a span (with candidate counts in and out), a latency histogram and a candidates histogram, and
its wall time lands in SearchResponse.timings_ms.
"""

from __future__ import annotations

import asyncio
import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from opentelemetry import trace

from services.retrieval import metrics
from services.retrieval.config import SearchConfig
from services.retrieval.hybrid import mmr, rrf, token_budget
from services.retrieval.models import Candidate, Condition
from services.retrieval.rerank import Reranker, RerankQuery
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store.base import VectorStore
from services.runtime.embed_client import EmbedClient
from services.runtime.errors import InvalidArgument


@functools.cache
def _stage_metrics(name: str) -> tuple[Any, Any]:
    """A stage's histogram children, looked up once: labels() twice per stage was ~60 us of every Search."""
    return metrics.STAGE_SECONDS.labels(name), metrics.STAGE_CANDIDATES.labels(name)


@functools.cache
def _searches(mode: str) -> Any:
    return metrics.SEARCHES.labels(mode)


@dataclass(frozen=True)
class SearchQuery:
    tenant: str
    text: str
    vector: np.ndarray | None
    top_k: int
    conditions: tuple[Condition, ...] = ()
    mode: str = "hybrid"
    rerank: bool = True
    mmr_lambda: float | None = None
    max_tokens: int = 0
    hnsw_ef: int | None = None


@dataclass
class SearchOutcome:
    hits: list[Candidate]
    mode: str
    timings_ms: dict[str, float] = field(default_factory=dict)


class SearchPipeline:
    def __init__(self, *, store: VectorStore, encoder: Bm25Encoder, settings: SearchConfig,
                 embedder: EmbedClient | None = None, reranker: Reranker | None = None) -> None:
        self.store = store
        self.encoder = encoder
        self.settings = settings
        self.embedder = embedder
        self.reranker = reranker

    @contextmanager
    def _stage(self, name: str, timings: dict[str, float], **attributes: object) -> Iterator[dict[str, int]]:
        """Times one stage; the body sets out["candidates"] so the histogram and the Search span record it.

        A stage is a few attributes of the RPC's server span (``ragfleet.stage.<name>_ms``,
        ``ragfleet.stage.<name>.candidates_out`` and the stage's own, e.g. ``ragfleet.stage.mmr.candidates_in``),
        not a span of its own, as the gateway records its Ask stages: the four spans of a hybrid Search were a third
        of the spans of an Ask, and with the mesh's own cost down to ~6 ms of CPU, 100 % exported tracing cost +21 %
        of it (bench/tracing_cost.py). For the same reason a setting every Search shares (the fusion's k, the legs'
        candidate limit max(candidates, top_k), the reranker's name) is not an attribute: the service logs it once
        at start; nor is a count another attribute gives (the reranker's input is its output)."""
        out: dict[str, int] = {}
        started = time.perf_counter()
        yield out
        elapsed = time.perf_counter() - started
        count = out.get("candidates", 0)
        span = trace.get_current_span()
        if span.is_recording():
            prefix = f"ragfleet.stage.{name}"
            span.set_attributes({f"{prefix}_ms": round(elapsed * 1000.0, 3), f"{prefix}.candidates_out": count,
                                 **{f"{prefix}.{key.removeprefix('ragfleet.')}": value
                                    for key, value in attributes.items()}})
        timings[name] = round(elapsed * 1000.0, 3)
        seconds, candidates = _stage_metrics(name)
        seconds.observe(elapsed)
        candidates.observe(count)

    async def _query_vector(self, query: SearchQuery, timings: dict[str, float]) -> np.ndarray | None:
        if query.vector is not None:
            return query.vector
        if query.mode == "sparse" or not query.text:
            return None
        if self.embedder is None:
            if query.mode == "dense":
                raise InvalidArgument("query_vector: required for mode DENSE because this retrieval service has no "
                                      "embedding service configured (RAGFLEET_RETRIEVAL_EMBEDDING_ADDRESS)")
            return None  # hybrid without an embedder degrades to BM25 only
        with self._stage("embed", timings) as out:
            vector = await self.embedder.embed_query(query.text)
            out["candidates"] = 1
        return vector

    async def _dense(self, query: SearchQuery, vector: np.ndarray, limit: int,
                     timings: dict[str, float]) -> list[Candidate]:
        with self._stage("dense", timings) as out:
            hits = await self.store.dense(query.tenant, vector.tolist(), limit, query.conditions,
                                          hnsw_ef=query.hnsw_ef)
            out["candidates"] = len(hits)
        return hits

    async def _sparse(self, query: SearchQuery, limit: int, timings: dict[str, float]) -> list[Candidate]:
        with self._stage("sparse", timings) as out:
            hits = await self.store.sparse(query.tenant, self.encoder.query(query.text), limit, query.conditions)
            out["candidates"] = len(hits)
        return hits

    async def _attach_vectors(self, tenant: str, ranked: list[Candidate], known: set[str]) -> list[Candidate]:
        """Stored vectors for the candidates whose dense score is not already known (usually few): converting the
        pool's vectors out of the engine was the largest single Python cost of a Search (~0.5 of 2.4 ms)."""
        missing = [c.point_id for c in ranked if c.point_id not in known and c.vector is None]
        if not missing:
            return ranked
        vectors = await self.store.fetch(tenant, missing, with_vectors=True)
        return [Candidate(c.point_id, c.score, c.payload, vectors[c.point_id].vector) if c.point_id in vectors else c
                for c in ranked]

    async def _fetch(self, tenant: str, ranked: list[Candidate], *, with_vectors: bool) -> list[Candidate]:
        """Attach payloads (and vectors) to the surviving candidates, keeping rank and score. A point deleted since
        the legs ran is dropped rather than returned without its text."""
        details = await self.store.fetch(tenant, [c.point_id for c in ranked], with_vectors=with_vectors)
        return [Candidate(c.point_id, c.score, details[c.point_id].payload, details[c.point_id].vector)
                for c in ranked if c.point_id in details]

    async def run(self, query: SearchQuery) -> SearchOutcome:
        timings: dict[str, float] = {}
        vector = await self._query_vector(query, timings)
        use_dense = vector is not None and query.mode in ("dense", "hybrid")
        use_sparse = bool(query.text) and query.mode in ("sparse", "hybrid")
        mode = "hybrid" if use_dense and use_sparse else ("dense" if use_dense else "sparse")
        _searches(mode).inc()
        limit = max(self.settings.candidates, query.top_k)

        dense_hits: list[Candidate] = []
        sparse_hits: list[Candidate] = []
        if use_dense and use_sparse:
            assert vector is not None
            dense_hits, sparse_hits = await asyncio.gather(self._dense(query, vector, limit, timings),
                                                           self._sparse(query, limit, timings))
        elif use_dense:
            assert vector is not None
            dense_hits = await self._dense(query, vector, limit, timings)
        else:
            sparse_hits = await self._sparse(query, limit, timings)

        if use_dense and use_sparse:
            with self._stage("fusion", timings) as out:
                ranked = rrf([dense_hits, sparse_hits], k=self.settings.rrf_k)
                out["candidates"] = len(ranked)
        else:
            ranked = dense_hits or sparse_hits

        reranking = query.rerank and self.reranker is not None
        pool_size = max(query.top_k, self.settings.rerank_candidates if reranking else 0,
                        self.settings.mmr_candidates if query.mmr_lambda is not None else 0)
        dense_scores = {c.point_id: c.score for c in dense_hits} if reranking else {}
        with self._stage("fetch", timings) as out:
            # MMR compares candidates with each other: every vector. The fusion rescorer only needs a cosine per
            # candidate, which the dense leg already holds for most of them.
            ranked = await self._fetch(query.tenant, ranked[:pool_size], with_vectors=query.mmr_lambda is not None)
            if reranking and vector is not None and getattr(self.reranker, "needs_vectors", False):
                depth = self.settings.rerank_candidates
                ranked = await self._attach_vectors(query.tenant, ranked[:depth], set(dense_scores)) + ranked[depth:]
            out["candidates"] = len(ranked)

        if reranking and ranked:
            assert self.reranker is not None
            # The depth bounds the reranker's cost (a cross-encoder scores every pair); candidates below it keep
            # their fused order (and fused score) after the reranked ones.
            pool, tail = ranked[:self.settings.rerank_candidates], ranked[self.settings.rerank_candidates:]
            with self._stage("rerank", timings) as out:
                lexical = {c.point_id: c.score for c in sparse_hits}
                ranked = await self.reranker.rerank(RerankQuery(query.text, vector, lexical, dense_scores),
                                                    pool) + tail
                out["candidates"] = len(pool)

        if query.mmr_lambda is not None and ranked:
            pool = ranked[:max(self.settings.mmr_candidates, query.top_k)]
            with self._stage("mmr", timings, **{"ragfleet.mmr_lambda": query.mmr_lambda,
                                                "ragfleet.candidates_in": len(pool)}) as out:
                ranked = mmr(vector, pool, lambda_=query.mmr_lambda, limit=query.top_k)
                out["candidates"] = len(ranked)

        hits = token_budget(ranked[:query.top_k], query.max_tokens)
        return SearchOutcome(hits, mode, timings)

