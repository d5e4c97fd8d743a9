"""Issue 10, defect 5 at retrieval: every size in Upsert, Delete and Search is bounded, refused with INVALID_ARGUMENT
naming the field, and a vector whose norm overflows (or underflows) float32 is refused like a NaN one, against the
real embedded engine (where a 3e38 vector was accepted and then scored 0 against everything)."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.config import SearchConfig
from services.runtime.errors import InvalidArgument
from services.runtime.pb.ragfleet.v1 import common_pb2, retrieval_pb2 as pb

from .conftest import DIM, unit
from .test_servicer import make_servicer


@pytest.fixture
async def servicer(tmp_path):
    svc = await make_servicer(str(tmp_path / "shard"), SearchConfig(max_top_k=20))
    yield svc
    await svc.store.close()


def chunk(**fields) -> pb.Chunk:
    fields.setdefault("doc_id", "d")
    fields.setdefault("text", "bees swarm in spring")
    fields.setdefault("vector", unit(np.random.default_rng(0)))
    return pb.Chunk(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(text="x" * 20_000_000), "chunks[0].text: 20000000 characters exceeds the limit of 32768"),
    (dict(chunk_id="c" * 1_000_000), "chunks[0].chunk_id: 1000000 characters exceeds the limit of 512"),
    (dict(doc_id="d" * 257), "chunks[0].doc_id: 257 characters exceeds the limit of 256"),
    (dict(title="t" * 1025), "chunks[0].title: 1025 characters exceeds the limit of 1024"),
    (dict(metadata={f"k{i}": "v" for i in range(10_000)}), "chunks[0].metadata: 10000 entries exceeds the limit of 64"),
    (dict(metadata={"k": "v" * 5_000_000}), "chunks[0].metadata['k']: value of 5000000 characters exceeds the limit"),
    (dict(metadata={"k" * 200: "v"}), "key of 200 characters exceeds the limit of 128"),
    (dict(vector=[3e38] * DIM), "chunks[0].vector: its norm overflows float32"),
    (dict(vector=[1e-30] * DIM), "chunks[0].vector: is all zeros or too small"),
])
async def test_oversized_upsert_is_refused_naming_the_field(servicer, fields, message) -> None:
    with pytest.raises(InvalidArgument) as err:
        await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=[chunk(**fields)]), None)
    assert message in err.value.message


@pytest.mark.parametrize("fields, message", [
    (dict(query_vector=[3e38] * DIM), "query_vector: its norm overflows float32"),
    (dict(query_vector=[-2e20] * DIM), "query_vector: its norm overflows float32"),
    (dict(query_vector=[1e-30] * DIM), "query_vector: is all zeros or too small"),
    (dict(query_text="x", filters=[common_pb2.FieldCondition(field="lang", any_of=["v" * 3000])]),
     "filters[0].any_of[0]: 3000 characters exceeds the limit of 2048"),
    (dict(query_text="x", filters=[common_pb2.FieldCondition(field="f" * 200, any_of=["v"])]),
     "filters[0].field: 200 characters exceeds the limit of 128"),
])
async def test_search_refuses_unusable_vectors_and_oversized_filters(servicer, fields, message) -> None:
    with pytest.raises(InvalidArgument) as err:
        await servicer.Search(pb.SearchRequest(tenant="acme", top_k=5, **fields), None)
    assert message in err.value.message


async def test_delete_bounds_ids(servicer) -> None:
    with pytest.raises(InvalidArgument, match="doc_ids: 10001 ids exceeds the limit of 10000"):
        await servicer.Delete(pb.DeleteRequest(tenant="acme", doc_ids=[f"d{i}" for i in range(10_001)]), None)
    with pytest.raises(InvalidArgument, match=r"doc_ids\[0\]: 1000000 characters"):
        await servicer.Delete(pb.DeleteRequest(tenant="acme", doc_ids=["d" * 1_000_000]), None)


async def test_a_large_but_sane_vector_is_accepted_and_scores(servicer) -> None:
    """The limits refuse only what the engine cannot score: an unnormalised vector of normal magnitude still works."""
    rng = np.random.default_rng(1)
    vector = (np.asarray(unit(rng)) * 1e6).tolist()
    await servicer.Upsert(pb.UpsertRequest(tenant="acme", chunks=[chunk(vector=vector, metadata={"lang": "en"})]),
                          None)
    reply = await servicer.Search(pb.SearchRequest(tenant="acme", top_k=1, query_vector=vector, rerank=False,
                                                   mode=common_pb2.SEARCH_MODE_DENSE), None)
    assert reply.hits and reply.hits[0].score > 0.99
