"""The retrieval service as a real process (LocalMesh): wire status codes, writes and searches, start-up errors,
and text queries embedded through the real embedding service."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from services.cli.mesh import LocalMesh, MeshError
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, retrieval_pb2 as pb,
                                             retrieval_pb2_grpc)

DIM = 384
TEXTS = {
    "bees": "Honeybees tell their sisters where flowers are with a waggle dance.",
    "wind": "Wind turbines turn the kinetic energy of moving air into electricity.",
    "moon": "The Moon's gravity raises the ocean tides twice a day.",
}


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("retrieval-mesh")
    with LocalMesh(data_dir=data_dir, env={"RAGFLEET_LOG_FORMAT": "text"}) as mesh:
        mesh.start(["retrieval"])
        with mesh.internal_channel("retrieval") as channel:
            yield mesh, retrieval_pb2_grpc.RetrievalServiceStub(channel)


def rand_chunks(doc_id: str, texts: list[str], seed: int) -> list[pb.Chunk]:
    rng = np.random.default_rng(seed)
    return [pb.Chunk(doc_id=doc_id, chunk_index=i, text=t, vector=rng.normal(size=DIM).tolist())
            for i, t in enumerate(texts)]


def test_write_search_delete_over_the_wire(retrieval):
    _, stub = retrieval
    reply = stub.Upsert(pb.UpsertRequest(tenant="t1", chunks=rand_chunks("bees", [TEXTS["bees"], "Queens lay eggs."],
                                                                         1)), timeout=10)
    assert reply.upserted == 2 and reply.corpus_version >= 1
    stub.Upsert(pb.UpsertRequest(tenant="t2", chunks=rand_chunks("bees", ["tenant two waggle dance"], 2)), timeout=10)
    hits = stub.Search(pb.SearchRequest(tenant="t1", query_text="waggle dance", top_k=5), timeout=10).hits
    assert [h.chunk_id for h in hits] == ["bees#0"] and hits[0].text == TEXTS["bees"]
    vector = rand_chunks("bees", ["x"], 1)[0].vector  # the stored vector of bees#0
    dense = stub.Search(pb.SearchRequest(tenant="t1", query_vector=vector, top_k=1,
                                         mode=common_pb2.SEARCH_MODE_DENSE), timeout=10)
    assert dense.hits[0].chunk_id == "bees#0" and dense.hits[0].score == pytest.approx(1.0, abs=1e-4)
    deleted = stub.Delete(pb.DeleteRequest(tenant="t1", doc_ids=["bees"]), timeout=10)
    assert deleted.deleted_chunks == 2
    assert not stub.Search(pb.SearchRequest(tenant="t1", query_text="waggle dance", top_k=5), timeout=10).hits
    assert len(stub.Search(pb.SearchRequest(tenant="t2", query_text="waggle dance", top_k=5), timeout=10).hits) == 1


@pytest.mark.parametrize("bad, detail", [
    (pb.SearchRequest(query_text="x", top_k=3), "tenant: required"),
    (pb.SearchRequest(tenant="t", query_text="x", top_k=0), "top_k: must be between 1 and 100"),
    (pb.SearchRequest(tenant="t", query_text="x", top_k=101), "top_k: must be between 1 and 100"),
    (pb.SearchRequest(tenant="t", top_k=3), "query_text, query_vector: at least one is required"),
    (pb.SearchRequest(tenant="t", query_vector=[0.5] * 3, top_k=3), "query_vector: has 3 values, expected 384"),
])
def test_bad_search_is_invalid_argument(retrieval, bad, detail):
    _, stub = retrieval
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and detail in err.value.details()


def test_bad_write_is_invalid_argument(retrieval):
    _, stub = retrieval
    with pytest.raises(grpc.RpcError) as err:
        stub.Upsert(pb.UpsertRequest(tenant="t", chunks=[pb.Chunk(doc_id="d", text="x", vector=[1.0])]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunks[0].vector" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Delete(pb.DeleteRequest(tenant="t"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "doc_ids" in err.value.details()


def test_locked_data_dir_is_a_clear_start_up_error(retrieval):
    mesh, _ = retrieval
    with LocalMesh(data_dir=mesh.data_dir, log_dir=mesh.data_dir / "second-logs") as second:
        with pytest.raises(MeshError, match="(?s)exited with code 3.*locked by another process"):
            second.start(["retrieval"], timeout=30)


def test_text_queries_are_embedded_by_the_embedding_service(tmp_path):
    with LocalMesh(data_dir=tmp_path, env={"RAGFLEET_LOG_FORMAT": "text"}) as mesh:
        mesh.start(["embedding", "retrieval"])
        with mesh.internal_channel("embedding") as emb_channel, mesh.internal_channel("retrieval") as channel:
            embed = embedding_pb2_grpc.EmbeddingServiceStub(emb_channel)
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            vectors = embed.Embed(embedding_pb2.EmbedRequest(texts=list(TEXTS.values()),
                                                             input_type=common_pb2.INPUT_TYPE_DOCUMENT), timeout=30)
            chunks = [pb.Chunk(doc_id=doc, chunk_index=0, text=text, vector=e.values)
                      for (doc, text), e in zip(TEXTS.items(), vectors.embeddings)]
            stub.Upsert(pb.UpsertRequest(tenant="t", chunks=chunks), timeout=10)
            # No shared word with the wind text: only the dense leg can find it.
            reply = stub.Search(pb.SearchRequest(tenant="t", query_text="renewable power generation", top_k=1,
                                                 mode=common_pb2.SEARCH_MODE_DENSE), timeout=10)
            assert reply.hits[0].doc_id == "wind" and {"embed", "dense"} <= set(reply.timings_ms)
            hybrid = stub.Search(pb.SearchRequest(tenant="t", query_text="why do oceans have tides", top_k=3),
                                 timeout=10)
            assert hybrid.hits[0].doc_id == "moon" and {"dense", "sparse", "fusion"} <= set(hybrid.timings_ms)
            mesh.processes["embedding"].process.kill()
            mesh.processes["embedding"].process.wait()
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(pb.SearchRequest(tenant="t", query_text="something new", top_k=3), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "embedding" in err.value.details()


def test_replicas_share_corpus_versions_through_redis(tmp_path, redis_prefix):
    """Two replicas (separate processes) behind one Redis: a write on one invalidates the other's cached results."""
    import uuid

    import redis

    from tests.conftest import REDIS_URL

    tenant = f"{redis_prefix}{uuid.uuid4().hex[:8]}"  # keys land under ragfleet:retrieval:*:<tenant>
    env = {"RAGFLEET_LOG_FORMAT": "text", "RAGFLEET_REDIS_URL": REDIS_URL}
    with LocalMesh(data_dir=tmp_path / "a", env=env) as a, LocalMesh(data_dir=tmp_path / "b", env=env) as b:
        a.start(["retrieval"])
        b.start(["retrieval"])
        with a.internal_channel("retrieval") as ca, b.internal_channel("retrieval") as cb:
            stub_a, stub_b = retrieval_pb2_grpc.RetrievalServiceStub(ca), retrieval_pb2_grpc.RetrievalServiceStub(cb)
            for stub in (stub_a, stub_b):
                stub.Upsert(pb.UpsertRequest(tenant=tenant, chunks=rand_chunks("d", ["tides and the moon"], 3)),
                            timeout=10)
            query = pb.SearchRequest(tenant=tenant, query_text="moon tides", top_k=3)
            first = stub_b.Search(query, timeout=10)
            assert not first.cached and stub_b.Search(query, timeout=10).cached
            assert stub_a.Search(query, timeout=10).cached  # L2: replica a reuses b's result
            version = stub_a.Upsert(pb.UpsertRequest(tenant=tenant, chunks=rand_chunks("e", ["new moon"], 4)),
                                    timeout=10).corpus_version
            after = stub_b.Search(query, timeout=10)
            assert not after.cached and after.corpus_version == version == first.corpus_version + 1
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"ragfleet:retrieval:*{tenant}*"))
    assert keys  # the versions and results really lived in Redis
    client.delete(*keys)
