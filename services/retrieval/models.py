"""Store-neutral records passed between the servicer, the stores and the search pipeline."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

# Fixed namespace: point ids must be identical across processes, replicas and restarts.
POINT_NAMESPACE = uuid.UUID("6f1c1a52-2b55-4c1e-9d0e-3f6a2f0b7a10")

# Payload keys. "meta" holds the string metadata, "meta_num" its numeric copies for range filters.
TENANT, DOC_ID, CHUNK_ID, CHUNK_INDEX, TITLE, TEXT, META, META_NUM = (
    "tenant", "doc_id", "chunk_id", "chunk_index", "title", "text", "meta", "meta_num")
BUILTIN_FILTER_FIELDS = {DOC_ID: DOC_ID, TITLE: TITLE, CHUNK_INDEX: CHUNK_INDEX}


def point_id(tenant: str, doc_id: str, chunk_index: int) -> str:
    """Deterministic id: re-ingesting a document overwrites its points instead of duplicating them."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{tenant}\x1f{doc_id}\x1f{chunk_index}"))


@dataclass(frozen=True)
class SparseVec:
    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk ready to be written: ids, text, dense and sparse vectors."""

    tenant: str
    chunk_id: str
    doc_id: str
    chunk_index: int
    title: str
    text: str
    vector: list[float]
    sparse: SparseVec
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def point_id(self) -> str:
        return point_id(self.tenant, self.doc_id, self.chunk_index)

    def payload(self) -> dict[str, Any]:
        numeric = {}
        for key, value in self.metadata.items():
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):  # "nan", "inf", "1e999" parse, but no engine stores them nor ranges over them
                numeric[key] = number
        return {TENANT: self.tenant, DOC_ID: self.doc_id, CHUNK_ID: self.chunk_id, CHUNK_INDEX: self.chunk_index,
                TITLE: self.title, TEXT: self.text, META: dict(self.metadata), META_NUM: numeric}


@dataclass(frozen=True)
class Condition:
    """A validated filter condition on a payload path (AND across conditions, OR within any_of)."""

    path: str
    any_of: tuple[str, ...] = ()
    gte: float | None = None
    lte: float | None = None


@dataclass
class Candidate:
    """A scored point from one leg or stage. `vector` is the stored (unit) dense vector when fetched."""

    point_id: str
    score: float
    payload: Mapping[str, Any]
    vector: np.ndarray | None = None

    @property
    def text(self) -> str:
        return str(self.payload.get(TEXT, ""))

    @property
    def title(self) -> str:
        return str(self.payload.get(TITLE, ""))


@dataclass(frozen=True)
class WriteResult:
    """What a store accepted: the ids written, and those that were not (with the cause)."""

    written: list[str]
    failed: list[str]
    error: str | None = None


@dataclass(frozen=True)
class IndexStatus:
    store: str
    points: int
    indexed_vectors: int
    segments: int
    state: str  # "empty" | "exact" (writes pending index, or too small to index) | "optimizing" | "indexed"
    last_optimize_seconds: float | None = None
