"""Embedded store: Qdrant's engine in-process (qdrant-edge-py), one shard directory under the data dir.

Engine calls block, so they run on threads: searches on a small pool, writes on one thread (ordered).
The HNSW build runs in a child process instead (`indexer.py` says why, and which directories it uses): once writes
have been quiet for `optimize_idle_seconds`, writes pause briefly while the shard is copied, the child indexes the
copy, and the indexed copy is swapped in with the writes made meanwhile replayed on it. Until the swap searches run
on the live shard, exactly over unindexed segments; `status()` reports which state holds.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

import numpy as np
import qdrant_edge as qe

from services.retrieval.config import IndexConfig
from services.retrieval.models import DOC_ID, TENANT, Candidate, ChunkRecord, Condition, IndexStatus, SparseVec
from services.retrieval.store.base import DENSE, SPARSE, StoreError, StoreStartupError, VectorStore
from services.retrieval.store.indexer import ShardFiles, SwapFailed
from services.runtime.errors import InvalidArgument

log = logging.getLogger("ragfleet.retrieval.edge")
T = TypeVar("T")

# Up to this many points a search, sparse search or fetch costs the engine less than the thread-pool hop around it
# (~0.1 ms of CPU: 40-65 us inline vs 120-170 us through the pool at 60 points; 290-350 vs 390-510 at 3000), so
# it runs inline on the event loop; bigger shards keep the pool, where the engine runs without the GIL.
INLINE_READ_MAX_POINTS = 2000
_ID_TEXT_MAX = 1 << 16  # remembered point-id texts; cleared when full (the hot ones return at once)
_id_text: dict[Any, str] = {}


class _Gate:
    """Lets engine calls run concurrently, but lets a swap wait for them to finish and hold new ones back."""

    def __init__(self) -> None:
        self._active = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    def is_open(self) -> bool:
        """No swap is waiting or running: a synchronous engine call made now cannot overlap one."""
        return self._open.is_set()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self._open.wait()
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()


def _filter(tenant: str, conditions: Sequence[Condition], *, must: Sequence[Any] = (),
            must_not: list[Any] | None = None) -> qe.Filter:
    must = [qe.FieldCondition(TENANT, match=qe.MatchValue(tenant)), *must]
    for cond in conditions:
        try:
            if cond.any_of:
                must.append(qe.FieldCondition(cond.path, match=qe.MatchAny(list(cond.any_of))))
            if cond.gte is not None or cond.lte is not None:
                must.append(qe.FieldCondition(cond.path, range=qe.RangeFloat(gte=cond.gte, lte=cond.lte)))
        except (ValueError, TypeError) as exc:  # validation should have caught it; never let it surface as INTERNAL
            raise InvalidArgument(f"filter on {cond.path!r}: rejected by the search engine: {exc}") from exc
    return qe.Filter(must=must, must_not=must_not)


def search_params(index: IndexConfig, hnsw_ef: int | None = None, exact: bool = False) -> qe.SearchParams:
    """Dense search parameters the service uses (public so the speed benchmark measures exactly these)."""
    quant = None
    if index.quantization == "int8":
        quant = qe.QuantizationSearchParams(rescore=True, oversampling=2.0)
    acorn = None
    if index.acorn_max_selectivity > 0:
        acorn = qe.AcornSearchParams(enable=True, max_selectivity=index.acorn_max_selectivity)
    return qe.SearchParams(hnsw_ef=hnsw_ef or index.hnsw_ef, exact=exact, quantization=quant, acorn=acorn)


def _text_id(point_id: Any) -> str:
    """The engine's point id (a uuid.UUID built anew for every result) as text, remembered: str() of a UUID was
    ~0.7 us, and a hybrid Search converts ~130 ids (both legs' candidates and the fetched ones)."""
    text = _id_text.get(point_id)
    if text is None:
        if len(_id_text) >= _ID_TEXT_MAX:
            _id_text.clear()
        text = _id_text[point_id] = str(point_id)
    return text


def _detail(record: Any) -> Candidate:
    # Each property access converts from Rust again (a 384-float list per `.vector`): read each exactly once.
    vectors = record.vector
    vector = vectors.get(DENSE) if isinstance(vectors, dict) else None
    return Candidate(_text_id(record.id), 0.0, record.payload or {},
                     None if vector is None else np.asarray(vector, dtype=np.float32))


class EdgeStore(VectorStore):
    name = "edge"

    def __init__(self, *, path: str, index: IndexConfig) -> None:
        self.path = path
        self.files = ShardFiles(path)
        self.index = index
        self._shard: qe.EdgeShard | None = None
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edge-search")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-write")
        self._last_write = 0.0
        self._dirty = False
        self._optimizing = False
        self._below_threshold = False  # the last check found the shard too small for an index: exact by design
        self._last_optimize_seconds: float | None = None
        self._wake: asyncio.Event | None = None
        self._indexing_task: asyncio.Task | None = None
        self._gate: _Gate | None = None
        self._optimize_lock: asyncio.Lock | None = None
        # Update operations applied since the build copy was taken; replayed on the indexed copy at swap time.
        self._journal: list[qe.UpdateOperation] | None = None
        self._lock_fd: int | None = None
        self._inline_reads = False  # the shard holds at most INLINE_READ_MAX_POINTS points (updated on each write)

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
            max_search_threads=self.index.search_threads or None,
        )

    async def start(self) -> None:
        self._shard = await asyncio.get_running_loop().run_in_executor(self._writer, self.open_shard)
        self._inline_reads = self._small(self._shard)
        self._gate = _Gate()
        self._optimize_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        if self.index.optimize_idle_seconds > 0:
            self._indexing_task = asyncio.create_task(self._indexing_loop(), name="edge-indexing")

    def open_shard(self) -> qe.EdgeShard:
        """Open (or create) the live shard; blocking. Finishes an interrupted swap first, never losing a write."""
        self._lock()
        try:
            return self._open_locked()
        except BaseException:
            self._unlock()
            raise

    def _open_locked(self) -> qe.EdgeShard:
        self.files.recover()
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

    def _lock(self) -> None:
        """Hold <path>.lock for the store's lifetime: recovery above rewrites directories, so it must never run
        while another process serves (or swaps) the same shard."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.files.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreStartupError(f"retrieval data dir {self.path!r} cannot be opened (locked by another "
                                    f"process: {self.files.lock}); nothing was changed or deleted") from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise StoreError("embedded store is not open")
        return self._shard

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[[], T], what: str) -> T:
        if self._gate is None:
            raise StoreError("embedded store is not open")
        try:
            async with self._gate.shared():
                return await asyncio.get_running_loop().run_in_executor(pool, fn)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"embedded engine failed to {what}: {exc}") from exc

    async def _read(self, fn: Callable[[], T], what: str) -> T:
        """A search-path read: inline while the shard is small and no swap holds the gate, else on the pool."""
        gate = self._gate
        if self._inline_reads and gate is not None and gate.is_open():
            try:
                return fn()
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"embedded engine failed to {what}: {exc}") from exc
        return await self._run(self._readers, fn, what)

    @staticmethod
    def _small(shard: qe.EdgeShard) -> bool:
        return shard.info().points_count <= INLINE_READ_MAX_POINTS

    def _touch(self) -> None:
        self._last_write = time.monotonic()
        self._dirty = True
        if self._wake is not None:
            self._wake.set()

    async def _write(self, records: Sequence[ChunkRecord]) -> None:
        try:
            points = [qe.Point(r.point_id, {DENSE: list(r.vector), SPARSE: qe.SparseVector(r.sparse.indices,
                                                                                            r.sparse.values)},
                               r.payload()) for r in records]
        except (TypeError, ValueError) as exc:  # a point the engine cannot represent fails alone, as a StoreError
            raise StoreError(f"embedded engine rejected a point: {exc}") from exc
        await self._apply(qe.UpdateOperation.upsert_points(points), "upsert")

    async def _apply(self, operation: qe.UpdateOperation, what: str) -> None:
        try:
            def update() -> bool:
                self.shard.update(operation)
                return self._small(self.shard)

            self._inline_reads = await self._run(self._writer, update, what)
        finally:
            self._touch()
        if self._journal is not None:
            self._journal.append(operation)

    async def delete_documents(self, tenant: str, doc_ids: Sequence[str],
                               keep_point_ids: Sequence[str] = ()) -> int:
        must_not = [qe.HasIdCondition(set(keep_point_ids))] if keep_point_ids else None
        flt = _filter(tenant, [Condition(DOC_ID, tuple(doc_ids))], must_not=must_not)

        removed = await self._run(self._writer, lambda: self.shard.count(qe.CountRequest(exact=True, filter=flt)),
                                  "count")
        if removed:
            await self._apply(qe.UpdateOperation.delete_points_by_filter(flt), "delete")
        return removed

    async def dense(self, tenant: str, vector: Sequence[float], limit: int, conditions: Sequence[Condition],
                    *, hnsw_ef: int | None = None, exact: bool = False) -> list[Candidate]:
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(list(vector), using=DENSE),
                                  filter=_filter(tenant, conditions), with_payload=False,
                                  params=search_params(self.index, hnsw_ef, exact))
        points = await self._read(lambda: self.shard.query(request), "search")
        return [Candidate(_text_id(p.id), float(p.score), {}) for p in points]

    async def sparse(self, tenant: str, query: SparseVec, limit: int,
                     conditions: Sequence[Condition]) -> list[Candidate]:
        if not query.indices:
            return []
        flt = _filter(tenant, conditions)
        # IDF over this tenant's points only: another tenant's corpus must not even shift our scores.
        idf = qe.IdfParams(corpus=_filter(tenant, ()))
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(qe.SparseVector(query.indices, query.values),
                                                                      using=SPARSE),
                                  filter=flt, with_payload=False, params=qe.SearchParams(idf=idf))
        points = await self._read(lambda: self.shard.query(request), "search")
        return [Candidate(_text_id(p.id), float(p.score), {}) for p in points]

    async def fetch(self, tenant: str, point_ids: Sequence[str], *, with_vectors: bool) -> dict[str, Candidate]:
        if not point_ids:
            return {}
        request = qe.ScrollRequest(limit=len(point_ids), with_payload=True, with_vector=[DENSE] if with_vectors
                                   else False, filter=_filter(tenant, (), must=[qe.HasIdCondition(set(point_ids))]))
        records, _ = await self._read(lambda: self.shard.scroll(request), "fetch")
        return {c.point_id: c for c in map(_detail, records)}

    async def count(self, tenant: str) -> int:
        request = qe.CountRequest(exact=True, filter=_filter(tenant, ()))
        return await self._run(self._readers, lambda: self.shard.count(request), "count")

    async def status(self) -> IndexStatus:
        info = await self._run(self._readers, lambda: self.shard.info(), "read shard info")
        if info.points_count == 0:
            state = "empty"
        elif self._optimizing:
            state = "optimizing"
        elif self._dirty or self._below_threshold:
            state = "exact"
        else:
            state = "indexed"
        return IndexStatus(self.name, info.points_count, info.indexed_vectors_count, info.segments_count, state,
                           self._last_optimize_seconds)

    async def optimize(self) -> bool:
        """Build HNSW (and int8 codes) in a child process on a copy, then swap it in. Returns False if the build
        failed (the live shard is untouched and keeps serving exactly)."""
        assert self._gate is not None and self._optimize_lock is not None
        loop = asyncio.get_running_loop()
        async with self._optimize_lock:
            self._optimizing = True
            started = time.monotonic()
            try:
                async with self._gate.exclusive():  # brief: no write may fall between flush and copy
                    writes_before = self._last_write
                    await loop.run_in_executor(self._writer, self.files.snapshot, self.shard)
                    self._journal = []
                await self.files.build()
                async with self._gate.exclusive():
                    journal, self._journal = self._journal, None
                    await self._swap(journal)
            except Exception as exc:  # noqa: BLE001 - a failed build must never take the live shard down
                self._journal = None
                await asyncio.to_thread(self.files.discard_build)
                log.error("index build failed; still serving the unindexed shard: %s", exc)
                return False
            finally:
                self._optimizing = False
        self._last_optimize_seconds = time.monotonic() - started
        if self._last_write == writes_before:
            self._dirty = False
        log.info("optimized", extra={"fields": {"seconds": round(self._last_optimize_seconds, 3),
                                                "replayed": len(journal)}})
        return True

    async def _swap(self, journal: list[qe.UpdateOperation]) -> None:
        loop = asyncio.get_running_loop()
        live, self._shard = self.shard, None  # closed by the swap: no engine call may reach it meanwhile
        try:
            self._shard = await loop.run_in_executor(self._writer, self.files.swap, live, journal)
        except SwapFailed as exc:
            self._shard = exc.shard
            raise
        await loop.run_in_executor(self._writer, self.files.discard_replaced)

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
            if await self._too_small_to_index():
                # No HNSW for it anyway, and a build would copy the shard's preallocated files (~180 MB even for a
                # handful of points) and start a child process after every burst of writes, for nothing.
                self._dirty = False
                continue
            if not await self.optimize():
                self._dirty = False  # retry after the next write, not in a tight loop

    async def _too_small_to_index(self) -> bool:
        """Whether the dense vectors fit under the indexing threshold, below which the engine searches exactly."""
        info = await self._run(self._readers, lambda: self.shard.info(), "read shard info")
        size_kb = info.points_count * self.index.dimension * 4 / 1024
        self._below_threshold = size_kb < self.index.indexing_threshold_kb
        return self._below_threshold

    async def close(self) -> None:
        if self._indexing_task is not None:
            self._indexing_task.cancel()
            try:
                await self._indexing_task
            except (asyncio.CancelledError, Exception):
                pass
        shard, self._shard = self._shard, None
        if shard is not None:
            # Flush and close on the write thread, after the writes queued there.
            try:
                await asyncio.get_running_loop().run_in_executor(self._writer, lambda: (shard.flush(), shard.close()))
            except Exception as exc:  # noqa: BLE001 - shutdown must finish; the WAL still holds acked writes
                log.error("closing the embedded engine failed: %s", exc)
        self._readers.shutdown(wait=False)
        self._writer.shutdown(wait=True)
        self._unlock()
