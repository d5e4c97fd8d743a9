"""One suite, both stores (as qdrant's congruence tests): the same writes must give the same answers."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.models import Condition
from services.retrieval.store.edge import EdgeStore
from services.retrieval.store.remote import RemoteStore
from services.retrieval.config import IndexConfig

from .conftest import DIM, detailed, make_record, unit

TEXTS = [
    "honeybees communicate the location of flowers with a waggle dance",
    "the queen bee lays up to two thousand eggs a day",
    "varroa mites weaken honeybee colonies in winter",
    "wind turbines convert kinetic energy into electricity",
    "solar panels lose efficiency as they heat up",
    "bumblebees can fly in colder weather than honeybees",
    "electric vehicles use lithium ion batteries",
    "the waggle dance encodes distance and direction",
]


def corpus(encoder, tenant="acme", seed=7):
    rng = np.random.default_rng(seed)
    return [make_record(encoder, tenant, f"doc{i // 2}", i % 2, text, unit(rng), lang="en" if i % 3 else "de",
                        year=str(2000 + i))
            for i, text in enumerate(TEXTS)]


async def test_dense_exact_order_and_scores(store, encoder):
    records = corpus(encoder)
    result = await store.upsert(records)
    assert result.failed == [] and len(result.written) == len(records)
    query = np.asarray(records[3].vector)
    hits = await store.dense("acme", query.tolist(), 5, ())
    expected = sorted(records, key=lambda r: -float(np.dot(r.vector, query)))[:5]
    assert [h.point_id for h in hits] == [r.point_id for r in expected]
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].vector is None and hits[0].payload == {}  # legs return ids and scores only
    top = (await detailed(store, "acme", hits, vectors=True))[0]
    assert top.vector is not None and top.vector.shape == (DIM,)
    assert top.vector == pytest.approx(np.asarray(records[3].vector), abs=1e-5)
    assert top.payload["doc_id"] == "doc1" and top.payload["meta"]["lang"] == "de"


async def test_sparse_bm25_ranks_lexical_matches(store, encoder):
    await store.upsert(corpus(encoder))
    hits = await store.sparse("acme", encoder.query("waggle dance"), 10, ())
    texts = [h.text for h in await detailed(store, "acme", hits)]
    assert set(texts) == {TEXTS[0], TEXTS[7]}  # only documents containing the terms
    # Shorter document with both terms scores higher under BM25 length normalisation.
    assert texts[0] == TEXTS[7]
    assert all(h.score > 0 for h in hits)


async def test_filters_any_of_and_range(store, encoder):
    await store.upsert(corpus(encoder))
    q = corpus(encoder)[0].vector
    hits = await detailed(store, "acme", await store.dense("acme", q, 10, (Condition("meta.lang", ("de",)),)))
    assert {h.payload["meta"]["lang"] for h in hits} == {"de"} and len(hits) == 3
    hits = await detailed(store, "acme", await store.dense("acme", q, 10,
                                                           (Condition("meta_num.year", (), 2002.0, 2004.0),)))
    assert sorted(h.payload["meta"]["year"] for h in hits) == ["2002", "2003", "2004"]
    hits = await detailed(store, "acme", await store.dense("acme", q, 10, (Condition("doc_id", ("doc0", "doc3")),)))
    assert sorted(h.payload["chunk_id"] for h in hits) == ["doc0#0", "doc0#1", "doc3#0", "doc3#1"]


async def test_tenant_isolation_is_adversarial_proof(store, encoder):
    """Tenant B stores near-duplicates of A's data; no query of A, however crafted, may see B's points."""
    a = corpus(encoder, "tenant-a", seed=1)
    b = [make_record(encoder, "tenant-b", r.doc_id, r.chunk_index, "SECRET " + r.text, r.vector, lang="en")
         for r in a]
    await store.upsert(a)
    await store.upsert(b)
    assert len({r.point_id for r in a} | {r.point_id for r in b}) == 2 * len(a)  # same doc ids, distinct points
    a_ids, b_ids = {r.point_id for r in a}, {r.point_id for r in b}
    for record in b:  # exact vectors and exact words of B's chunks
        dense = await store.dense("tenant-a", record.vector, 50, ())
        sparse = await store.sparse("tenant-a", encoder.query(record.text), 50, ())
        assert {h.point_id for h in dense + sparse} <= a_ids
        for hit in await detailed(store, "tenant-a", dense + sparse):
            assert hit.payload["tenant"] == "tenant-a" and "SECRET" not in hit.text
    # A filter naming B's doc ids from A's side still sees only A's points.
    hits = await store.dense("tenant-a", b[0].vector, 50, (Condition("doc_id", tuple(r.doc_id for r in b)),))
    assert {h.point_id for h in hits} <= a_ids
    assert await store.sparse("tenant-a", encoder.query("secret"), 50, ()) == []
    # Knowing B's point ids does not help either: the detail lookup is tenant-filtered too.
    assert await store.fetch("tenant-a", sorted(b_ids), with_vectors=True) == {}
    # Deleting A's documents leaves B untouched.
    removed = await store.delete_documents("tenant-a", sorted({r.doc_id for r in a}))
    assert removed == len(a)
    assert await store.count("tenant-a") == 0 and await store.count("tenant-b") == len(b)


async def test_idempotent_upsert_and_replace_with_fewer_chunks(store, encoder):
    records = corpus(encoder)
    await store.upsert(records)
    await store.upsert(records)  # same deterministic ids: no duplicates
    assert await store.count("acme") == len(records)
    removed = await store.delete_documents("acme", ["doc0"], keep_point_ids=[records[0].point_id])
    assert removed == 1
    hits = await store.dense("acme", records[1].vector, 20, (Condition("doc_id", ("doc0",)),))
    assert [h.payload["chunk_id"] for h in await detailed(store, "acme", hits)] == ["doc0#0"]


async def test_partial_failure_reports_exactly_what_was_written(store, encoder):
    """The second engine batch carries a vector of the wrong size (validation bypassed): the engine rejects it.
    Every chunk must land in exactly one list, and the store must hold exactly the `written` ones."""
    rng = np.random.default_rng(3)
    good = [make_record(encoder, "acme", f"g{i}", 0, f"text {i}", unit(rng)) for i in range(256)]
    bad = [make_record(encoder, "acme", "bad", 0, "broken", unit(rng, DIM + 1))]
    tail = [make_record(encoder, "acme", "tail", 0, "never written", unit(rng))]
    result = await store.upsert(good + bad + tail)
    assert result.written == [r.chunk_id for r in good + tail]
    assert result.failed == ["bad#0"] and result.error
    assert await store.count("acme") == 257
    assert await store.sparse("acme", encoder.query("broken"), 5, ()) == []


async def test_status_reports_points(store, encoder):
    assert (await store.status()).state == "empty"
    await store.upsert(corpus(encoder))
    status = await store.status()
    assert status.points == len(TEXTS) and status.state in ("exact", "indexed")


async def test_stores_agree_on_hybrid_legs(tmp_path, encoder):
    index = IndexConfig(dimension=DIM, optimize_idle_seconds=0)
    edge, remote = EdgeStore(path=str(tmp_path / "e"), index=index), RemoteStore(url=":memory:", collection="c",
                                                                              index=index)
    for s in (edge, remote):
        await s.start()
        await s.upsert(corpus(encoder))
        await s.upsert(corpus(encoder, "other", seed=9)[:3])
    try:
        for text in ("honeybee waggle dance", "electric energy", "bees in winter"):
            e = await edge.sparse("acme", encoder.query(text), 5, ())
            r = await remote.sparse("acme", encoder.query(text), 5, ())
            assert [h.point_id for h in e] == [h.point_id for h in r]
            assert [h.score for h in e] == pytest.approx([h.score for h in r], rel=1e-3)
        q = corpus(encoder)[5].vector
        e, r = await edge.dense("acme", q, 8, ()), await remote.dense("acme", q, 8, ())
        assert [h.point_id for h in e] == [h.point_id for h in r]
        assert [h.score for h in e] == pytest.approx([h.score for h in r], abs=1e-4)
    finally:
        await edge.close()
        await remote.close()
