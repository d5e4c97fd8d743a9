"""Embedded store: Qdrant's engine in-process (qdrant-edge-py), one shard directory under the data dir.

The engine's calls block, so they run on threads: searches on a small pool, writes on one thread (ordered), and the
HNSW build (`optimize()`, which blocks until done) on its own thread once writes have been quiet for
`optimize_idle_seconds`. Until then unindexed segments are searched exactly; `status()` reports which state holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import qdrant_edge as qe

from services.retrieval.config import IndexConfig
from services.retrieval.models import DOC_ID, TENANT, Candidate, ChunkRecord, Condition, IndexStatus, SparseVec
from services.retrieval.store.base import DENSE, SPARSE, StoreError, StoreStartupError, VectorStore

log = logging.getLogger("ragfleet.retrieval.edge")
T = TypeVar("T")


def _filter(tenant: str, conditions: Sequence[Condition], *, must_not: list[Any] | None = None) -> qe.Filter:
    must: list[Any] = [qe.FieldCondition(TENANT, match=qe.MatchValue(tenant))]
    for cond in conditions:
        if cond.any_of:
            must.append(qe.FieldCondition(cond.path, match=qe.MatchAny(list(cond.any_of))))
        if cond.gte is not None or cond.lte is not None:
            must.append(qe.FieldCondition(cond.path, range=qe.RangeFloat(gte=cond.gte, lte=cond.lte)))
    return qe.Filter(must=must, must_not=must_not)


def _candidate(point: Any) -> Candidate:
    vector = point.vector.get(DENSE) if isinstance(point.vector, dict) else None
    return Candidate(str(point.id), float(point.score), point.payload or {},
                     None if vector is None else np.asarray(vector, dtype=np.float32))


class EdgeStore(VectorStore):
    name = "edge"

    def __init__(self, *, path: str, index: IndexConfig) -> None:
        self.path = path
        self.index = index
        self._shard: qe.EdgeShard | None = None
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edge-search")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-write")
        self._indexer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-optimize")
        self._last_write = 0.0
        self._dirty = False
        self._optimizing = False
        self._last_optimize_seconds: float | None = None
        self._wake: asyncio.Event | None = None
        self._indexing_task: asyncio.Task | None = None

    def _config(self) -> qe.EdgeConfig:
        quantization = None
        if self.index.quantization == "int8":
            quantization = qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        return qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=self.index.dimension, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            hnsw_config=qe.HnswIndexConfig(m=self.index.hnsw_m, ef_construct=self.index.hnsw_ef_construct,
                                           full_scan_threshold=self.index.indexing_threshold_kb),
            quantization_config=quantization,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=self.index.indexing_threshold_kb),
        )

    async def start(self) -> None:
        self._shard = await asyncio.get_running_loop().run_in_executor(self._writer, self._open)
        self._wake = asyncio.Event()
        if self.index.optimize_idle_seconds > 0:
            self._indexing_task = asyncio.create_task(self._indexing_loop(), name="edge-indexing")

    def _open(self) -> qe.EdgeShard:
        existing = os.path.isdir(self.path) and any(os.scandir(self.path))
        try:
            if existing:
                shard = qe.EdgeShard.load(self.path, self._config())
            else:
                os.makedirs(self.path, exist_ok=True)
                shard = qe.EdgeShard.create(self.path, self._config())
                shard.update(qe.UpdateOperation.create_field_index(TENANT, qe.KeywordIndexParams(is_tenant=True)))
                shard.update(qe.UpdateOperation.create_field_index(DOC_ID, qe.PayloadSchemaType.Keyword))
        except Exception as exc:  # the engine raises a bare Exception with the cause in the text
            hint = "locked by another process" if "WouldBlock" in str(exc) or "lock" in str(exc).lower() else \
                "unreadable, corrupt or created with another dimension"
            raise StoreStartupError(f"retrieval data dir {self.path!r} cannot be opened ({hint}); nothing was "
                                    f"changed or deleted. Engine said: {exc}") from exc
        if existing:
            self._dirty = True  # index whatever an earlier run left unoptimized
        return shard

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise StoreError("embedded store is not open")
        return self._shard

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"embedded engine failed to {what}: {exc}") from exc

    def _touch(self) -> None:
        self._last_write = time.monotonic()
        self._dirty = True
        if self._wake is not None:
            self._wake.set()

    async def _write(self, records: Sequence[ChunkRecord]) -> None:
        points = [qe.Point(r.point_id, {DENSE: list(r.vector), SPARSE: qe.SparseVector(r.sparse.indices,
                                                                                        r.sparse.values)},
                           r.payload()) for r in records]
        try:
            await self._run(self._writer, lambda: self.shard.update(qe.UpdateOperation.upsert_points(points)),
                            "upsert")
        finally:
            self._touch()

    async def delete_documents(self, tenant: str, doc_ids: Sequence[str],
                               keep_point_ids: Sequence[str] = ()) -> int:
        must_not = [qe.HasIdCondition(set(keep_point_ids))] if keep_point_ids else None
        flt = _filter(tenant, [Condition(DOC_ID, tuple(doc_ids))], must_not=must_not)

        def delete() -> int:
            n = self.shard.count(qe.CountRequest(exact=True, filter=flt))
            if n:
                self.shard.update(qe.UpdateOperation.delete_points_by_filter(flt))
            return n

        removed = await self._run(self._writer, delete, "delete")
        if removed:
            self._touch()
        return removed

    def _params(self, hnsw_ef: int | None, exact: bool) -> qe.SearchParams:
        quant = None
        if self.index.quantization == "int8":
            quant = qe.QuantizationSearchParams(rescore=True, oversampling=2.0)
        return qe.SearchParams(hnsw_ef=hnsw_ef or self.index.hnsw_ef, exact=exact, quantization=quant)

    async def dense(self, tenant: str, vector: Sequence[float], limit: int, conditions: Sequence[Condition],
                    *, hnsw_ef: int | None = None, exact: bool = False) -> list[Candidate]:
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(list(vector), using=DENSE),
                                  filter=_filter(tenant, conditions), with_payload=True, with_vector=[DENSE],
                                  params=self._params(hnsw_ef, exact))
        points = await self._run(self._readers, lambda: self.shard.query(request), "search")
        return [_candidate(p) for p in points]

    async def sparse(self, tenant: str, query: SparseVec, limit: int,
                     conditions: Sequence[Condition]) -> list[Candidate]:
        if not query.indices:
            return []
        flt = _filter(tenant, conditions)
        # IDF over this tenant's points only: another tenant's corpus must not even shift our scores.
        idf = qe.IdfParams(corpus=_filter(tenant, ()))
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(qe.SparseVector(query.indices, query.values),
                                                                      using=SPARSE),
                                  filter=flt, with_payload=True, with_vector=[DENSE],
                                  params=qe.SearchParams(idf=idf))
        points = await self._run(self._readers, lambda: self.shard.query(request), "search")
        return [_candidate(p) for p in points]

    async def count(self, tenant: str) -> int:
        request = qe.CountRequest(exact=True, filter=_filter(tenant, ()))
        return await self._run(self._readers, lambda: self.shard.count(request), "count")

    async def status(self) -> IndexStatus:
        info = await self._run(self._readers, self.shard.info, "read shard info")
        if info.points_count == 0:
            state = "empty"
        elif self._optimizing:
            state = "optimizing"
        elif self._dirty:
            state = "exact"
        else:
            state = "indexed"
        return IndexStatus(self.name, info.points_count, info.indexed_vectors_count, info.segments_count, state,
                           self._last_optimize_seconds)

    async def optimize(self) -> bool:
        """Build HNSW (and int8 codes) now; blocks a dedicated thread, never the event loop."""
        self._optimizing = True
        started = time.monotonic()
        writes_before = self._last_write
        try:
            changed = await self._run(self._indexer, self.shard.optimize, "optimize")
        finally:
            self._optimizing = False
        self._last_optimize_seconds = time.monotonic() - started
        if self._last_write == writes_before:
            self._dirty = False
        log.info("optimized", extra={"fields": {"seconds": round(self._last_optimize_seconds, 3),
                                                "changed": changed}})
        return changed

    async def _indexing_loop(self) -> None:
        """Wait until writes settle, then index; repeat whenever new writes arrive."""
        assert self._wake is not None
        idle = self.index.optimize_idle_seconds
        while True:
            if not self._dirty:
                self._wake.clear()
                await self._wake.wait()
            quiet = time.monotonic() - self._last_write
            if quiet < idle:
                await asyncio.sleep(idle - quiet)
                continue
            try:
                await self.optimize()
            except StoreError:
                log.exception("background optimize failed; will retry after the next write")
                self._dirty = False

    async def close(self) -> None:
        if self._indexing_task is not None:
            self._indexing_task.cancel()
            try:
                await self._indexing_task
            except (asyncio.CancelledError, Exception):
                pass
        shard, self._shard = self._shard, None
        if shard is not None:
            # Wait for a running optimize, then flush and close on the write thread (after queued writes).
            self._indexer.shutdown(wait=True)
            try:
                await asyncio.get_running_loop().run_in_executor(self._writer, lambda: (shard.flush(), shard.close()))
            except Exception as exc:  # noqa: BLE001 - shutdown must finish; the WAL still holds acked writes
                log.error("closing the embedded engine failed: %s", exc)
        self._readers.shutdown(wait=False)
        self._writer.shutdown(wait=True)
