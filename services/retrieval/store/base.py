"""The one store interface (as qdrant-client's QdrantBase): every operation is scoped to one tenant.

No method takes "no tenant": a search or delete without the caller's tenant cannot be expressed, which is how
cross-tenant reads are ruled out by construction rather than by each caller remembering a filter.
"""

from __future__ import annotations

import abc
from typing import Sequence

from services.retrieval.models import Candidate, ChunkRecord, Condition, IndexStatus, SparseVec, WriteResult

DENSE = "dense"  # named dense vector
SPARSE = "bm25"  # named sparse vector (IDF modifier)
WRITE_BATCH = 256  # points per engine write; a failure reports every earlier batch as written


class StoreError(Exception):
    """The engine failed an operation (mapped to UNAVAILABLE with this cause)."""


class StoreStartupError(RuntimeError):
    """The data dir or server cannot be opened (locked, corrupt, incompatible); start-up stops, nothing is wiped."""


class VectorStore(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Open or create the collection/shard and its payload indexes (tenant, doc id)."""

    @abc.abstractmethod
    async def _write(self, records: Sequence[ChunkRecord]) -> None:
        """Write one batch; returns once the engine accepted it, raises StoreError otherwise."""

    async def upsert(self, records: Sequence[ChunkRecord]) -> WriteResult:
        """Write in batches; never raises for a rejected write but reports exactly what was written.

        An engine may apply part of a rejected batch (qdrant-edge keeps the points it had accepted), so a failed
        batch is retried point by point: each single-point write is atomic and idempotent (deterministic ids),
        which makes `written` and `failed` exact. Every chunk lands in exactly one of the two lists.
        """
        written: list[str] = []
        failed: list[str] = []
        error: str | None = None
        for start in range(0, len(records), WRITE_BATCH):
            batch = records[start:start + WRITE_BATCH]
            try:
                await self._write(batch)
                written.extend(r.chunk_id for r in batch)
                continue
            except StoreError as exc:
                error = str(exc)
            for record in batch:
                try:
                    await self._write([record])
                    written.append(record.chunk_id)
                except StoreError as exc:
                    failed.append(record.chunk_id)
                    error = str(exc)
        return WriteResult(written, failed, error)

    @abc.abstractmethod
    async def delete_documents(self, tenant: str, doc_ids: Sequence[str],
                               keep_point_ids: Sequence[str] = ()) -> int:
        """Delete the tenant's points of these documents except `keep_point_ids`; returns how many were removed."""

    @abc.abstractmethod
    async def dense(self, tenant: str, vector: Sequence[float], limit: int, conditions: Sequence[Condition],
                    *, hnsw_ef: int | None = None, exact: bool = False) -> list[Candidate]:
        """Nearest neighbours by cosine within the tenant: ids and scores only (payloads come from `fetch`)."""

    @abc.abstractmethod
    async def sparse(self, tenant: str, query: SparseVec, limit: int,
                     conditions: Sequence[Condition]) -> list[Candidate]:
        """BM25 within the tenant (IDF over the tenant's own points): ids and scores only."""

    @abc.abstractmethod
    async def fetch(self, tenant: str, point_ids: Sequence[str], *, with_vectors: bool) -> dict[str, Candidate]:
        """Payload (and stored unit vector) of the tenant's points among `point_ids`, keyed by id. Ids of another
        tenant are simply absent: the lookup is filtered by tenant like every other read.

        Legs return ids only because converting 100 payloads and 384-float vectors per leg costs more than the
        search itself; the pipeline fetches details once, for the few candidates that survive fusion."""

    @abc.abstractmethod
    async def count(self, tenant: str) -> int:
        ...

    @abc.abstractmethod
    async def status(self) -> IndexStatus:
        ...

    async def optimize(self) -> bool:
        """Build indexes now (blocking work runs off the event loop). Remote servers optimize by themselves."""
        return False

    @abc.abstractmethod
    async def close(self) -> None:
        ...
