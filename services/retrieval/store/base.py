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
    async def upsert(self, records: Sequence[ChunkRecord]) -> WriteResult:
        """Write points in batches; returns only after the engine accepted them. Must not raise on a failed batch:
        report it in WriteResult.failed (with every later batch) so the caller knows exactly what was written."""

    @abc.abstractmethod
    async def delete_documents(self, tenant: str, doc_ids: Sequence[str],
                               keep_point_ids: Sequence[str] = ()) -> int:
        """Delete the tenant's points of these documents except `keep_point_ids`; returns how many were removed."""

    @abc.abstractmethod
    async def dense(self, tenant: str, vector: Sequence[float], limit: int, conditions: Sequence[Condition],
                    *, hnsw_ef: int | None = None, exact: bool = False) -> list[Candidate]:
        """Nearest neighbours by cosine within the tenant, with stored vectors."""

    @abc.abstractmethod
    async def sparse(self, tenant: str, query: SparseVec, limit: int,
                     conditions: Sequence[Condition]) -> list[Candidate]:
        """BM25 within the tenant (IDF over the tenant's own points), with stored dense vectors."""

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
