"""Ingestor: embedding batches, bounded concurrency and whole-document replacing Upserts; the corpus version after a
write (real Redis), advanced by retrieval alone — it is the reported version, and its failure never hides the
write's own outcome."""

from __future__ import annotations

import asyncio
import zlib

import grpc
import pytest
import redis.asyncio as aioredis

from services.gateway.chunker import WordTokenizer, chunk_text, embed_text
from services.gateway.config import CacheConfig, IngestConfig, StageBudgets
from services.gateway.deadlines import Deadline
from services.gateway.ingest import Ingestor
from services.gateway.response_cache import CachedAnswer, ResponseCache
from services.runtime.corpus_version import CorpusVersions
from services.runtime.errors import Unavailable
from services.runtime.pb.ragfleet.v1 import embedding_pb2, gateway_pb2, retrieval_pb2

DOCUMENT = gateway_pb2.Document(doc_id="d1", title="T", text="Hello world. This is a document.")


class FakeEmbedding:
    async def embed(self, texts, *, input_type, timeout):
        return embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=[1.0, 0.0]) for _ in texts])


class FakeRetrieval:
    """Writes nothing, but owns the corpus version as retrieval does: bumped after every write, failed or not, and
    reported as 0 when the bump fails."""

    def __init__(self, versions: CorpusVersions, *, fail: bool = False) -> None:
        self.versions = versions
        self.fail = fail
        self.upserts = 0

    async def upsert(self, request, *, timeout):
        try:
            if self.fail:
                raise Unavailable("retrieval service: store is down")
            self.upserts += 1
        finally:
            version = await self.versions.bump(request.tenant)
        return retrieval_pb2.UpsertResponse(upserted=len(request.chunks), corpus_version=version or 0)

    async def delete(self, request, *, timeout):
        try:
            if self.fail:
                raise Unavailable("retrieval service: store is down")
        finally:
            version = await self.versions.bump(request.tenant)
        return retrieval_pb2.DeleteResponse(deleted_chunks=2, corpus_version=version or 0)


def _template(prefix: str) -> str:
    return prefix + "version:{tenant}"


def _cache(prefix: str, client) -> ResponseCache:
    return ResponseCache(CacheConfig(redis_prefix=prefix, corpus_version_key=_template(prefix)), client)


def _retrieval(prefix: str, client, *, fail: bool = False) -> FakeRetrieval:
    return FakeRetrieval(CorpusVersions(client, template=_template(prefix)), fail=fail)


def _ingestor(cache: ResponseCache, retrieval: FakeRetrieval, config: IngestConfig = IngestConfig()) -> Ingestor:
    return Ingestor(embedding=FakeEmbedding(), retrieval=retrieval, cache=cache, tokenizer=WordTokenizer(),
                    config=config, budgets=StageBudgets())


@pytest.fixture
async def dead_redis():
    """A real client whose server is gone: every command (so every bump) fails."""
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    yield client
    await client.aclose()


async def test_ingest_and_delete_report_the_version_the_cache_is_keyed_on(redis_client, redis_prefix):
    cache = _cache(redis_prefix, redis_client)
    ingestor = _ingestor(cache, _retrieval(redis_prefix, redis_client))
    ingested = await ingestor.ingest("t", gateway_pb2.IngestRequest(documents=[DOCUMENT]), Deadline(None))
    assert ingested.corpus_version == await cache.current_version("t") > 0
    deleted = await ingestor.delete("t", gateway_pb2.DeleteDocumentsRequest(doc_ids=["d1"]), Deadline(None))
    assert deleted.corpus_version == await cache.current_version("t") > ingested.corpus_version
    assert deleted.deleted_chunks == 2


async def test_bump_failure_after_a_successful_write_is_unavailable_saying_the_data_is_in(dead_redis):
    retrieval = _retrieval("x:", dead_redis)
    ingestor = _ingestor(_cache("x:", dead_redis), retrieval)
    with pytest.raises(Unavailable) as info:
        await ingestor.ingest("t", gateway_pb2.IngestRequest(documents=[DOCUMENT]), Deadline(None))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "were written" in info.value.message and "retried" in info.value.message, info.value.message
    assert retrieval.upserts == 1
    with pytest.raises(Unavailable, match="were deleted.*could not be invalidated"):
        await ingestor.delete("t", gateway_pb2.DeleteDocumentsRequest(doc_ids=["d1"]), Deadline(None))


async def test_a_failed_write_raises_its_own_error_even_if_the_bump_fails_too(dead_redis):
    ingestor = _ingestor(_cache("x:", dead_redis), _retrieval("x:", dead_redis, fail=True))
    with pytest.raises(Unavailable, match="retrieval service: store is down"):
        await ingestor.ingest("t", gateway_pb2.IngestRequest(documents=[DOCUMENT]), Deadline(None))
    with pytest.raises(Unavailable, match="retrieval service: store is down"):
        await ingestor.delete("t", gateway_pb2.DeleteDocumentsRequest(doc_ids=["d1"]), Deadline(None))


async def test_a_failed_write_still_invalidates_cached_answers(redis_client, redis_prefix):
    cache = _cache(redis_prefix, redis_client)
    key = cache.key("t", "q", b"")
    version, _ = await cache.lookup("t", key)
    await cache.store("t", key, CachedAnswer(version, "old answer", b"", 1, (0, 0, 0), "m"), None, fingerprint=b"")
    with pytest.raises(Unavailable):
        await _ingestor(cache, _retrieval(redis_prefix, redis_client, fail=True)).ingest(
            "t", gateway_pb2.IngestRequest(documents=[DOCUMENT]), Deadline(None))
    assert (await cache.lookup("t", key))[1] is None, "a partly failed write may have changed the corpus"



def _vector(text: str) -> list[float]:
    """What RecordingEmbedding answers for a text: lets a test check each chunk got its own vector."""
    return [float(zlib.crc32(text.encode()) % 1_000_003)]  # exact in float32


class InFlight:
    """Upstream calls in progress right now, and the most there ever were (embedding and retrieval together)."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def call(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.now -= 1


class RecordingEmbedding:
    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight
        self.batches: list[list[str]] = []

    async def embed(self, texts, *, input_type, timeout):
        self.batches.append(list(texts))
        await self.in_flight.call()
        return embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=_vector(t)) for t in texts])


class RecordingRetrieval:
    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight
        self.upserts: list[retrieval_pb2.UpsertRequest] = []

    async def upsert(self, request, *, timeout):
        self.upserts.append(request)
        await self.in_flight.call()
        return retrieval_pb2.UpsertResponse(upserted=len(request.chunks), corpus_version=len(self.upserts))


async def test_ingest_embeds_in_batches_bounded_in_flight_and_upserts_whole_documents_replacing_them():
    config = IngestConfig(chunk_tokens=16, chunk_overlap=0, max_chunk_tokens=16, embed_batch=3, upsert_batch=5,
                          concurrency=2)
    words = [10, 20, 40, 100, 10, 20, 10]  # 1, 2, 5, 12 (> upsert_batch), 1, 2, 1 chunks
    documents = [gateway_pb2.Document(doc_id=f"doc{i}", title=f"Title {i}",
                                      text=" ".join(f"w{j}." if j % 8 == 7 else f"w{j}" for j in range(n)))
                 for i, n in enumerate(words)]
    expected = {d.doc_id: [c.text for c in chunk_text(WordTokenizer(), d.title, d.text, chunk_tokens=16, overlap=0)]
                for d in documents}
    in_flight = InFlight()
    embedding, retrieval = RecordingEmbedding(in_flight), RecordingRetrieval(in_flight)
    ingestor = Ingestor(embedding=embedding, retrieval=retrieval, cache=ResponseCache(CacheConfig(), None),
                        tokenizer=WordTokenizer(), config=config, budgets=StageBudgets())
    response = await ingestor.ingest("t", gateway_pb2.IngestRequest(documents=documents), Deadline(None))

    total = sum(len(chunks) for chunks in expected.values())
    assert [len(chunks) for chunks in expected.values()] == [1, 2, 5, 12, 1, 2, 1]
    assert (response.documents, response.chunks_written) == (len(documents), total)
    assert max(len(batch) for batch in embedding.batches) <= config.embed_batch
    assert sum(len(batch) for batch in embedding.batches) == total, "each chunk embedded once"
    assert in_flight.peak == config.concurrency, f"{in_flight.peak} upstream calls at once"
    upserted: dict[str, list[retrieval_pb2.Chunk]] = {}
    for request in retrieval.upserts:
        assert request.replace_documents and request.tenant == "t"
        doc_ids = {chunk.doc_id for chunk in request.chunks}
        assert len(request.chunks) <= config.upsert_batch or len(doc_ids) == 1, "only a big document goes alone"
        assert not doc_ids & upserted.keys(), "a document was split across two Upserts"
        for chunk in request.chunks:
            upserted.setdefault(chunk.doc_id, []).append(chunk)
    assert len(retrieval.upserts) == 4
    for doc in documents:
        chunks = upserted[doc.doc_id]
        assert [(c.chunk_id, c.chunk_index, c.text) for c in chunks] == [
            (f"{doc.doc_id}#{i}", i, text) for i, text in enumerate(expected[doc.doc_id])]
        assert all(list(c.vector) == _vector(embed_text(doc.title, c.text)) for c in chunks)
