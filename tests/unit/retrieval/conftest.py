"""Fixtures for retrieval unit tests: both real stores (embedded qdrant-edge, qdrant-client local mode)."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.config import Bm25Config, IndexConfig
from services.retrieval.models import ChunkRecord
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store.edge import EdgeStore
from services.retrieval.store.remote import RemoteStore

DIM = 16


@pytest.fixture(scope="session")
def encoder() -> Bm25Encoder:
    return Bm25Encoder(Bm25Config())


def unit(rng: np.random.Generator, dim: int = DIM) -> list[float]:
    v = rng.normal(size=dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def make_record(encoder: Bm25Encoder, tenant: str, doc_id: str, index: int, text: str, vector: list[float],
                **metadata: str) -> ChunkRecord:
    return ChunkRecord(tenant=tenant, chunk_id=f"{doc_id}#{index}", doc_id=doc_id, chunk_index=index, title="",
                       text=text, vector=vector, sparse=encoder.document(text), metadata=metadata)


@pytest.fixture(params=["edge", "remote"])
async def store(request, tmp_path):
    index = IndexConfig(dimension=DIM, optimize_idle_seconds=0)
    if request.param == "edge":
        s = EdgeStore(path=str(tmp_path / "shard"), index=index)
    else:
        s = RemoteStore(url=":memory:", collection="test", index=index)
    await s.start()
    yield s
    await s.close()


async def detailed(store, tenant: str, hits, *, vectors: bool = False):
    """The hits in rank order with payload (and vectors) attached, as the pipeline's fetch stage does."""
    found = await store.fetch(tenant, [h.point_id for h in hits], with_vectors=vectors)
    return [found[h.point_id] for h in hits if h.point_id in found]
