"""Ingestion: documents -> token-aware chunks -> embeddings in batches -> retrieval upserts, bounded concurrency.

Idempotent per doc_id: chunk ids are deterministic (`<doc_id>#<index>`) and every Upsert carries whole documents
with ``replace_documents``, so re-ingesting a shorter version removes the chunks it no longer has. (A document is
never split across two Upserts: the second would delete the first one's chunks.) Retrieval advances the tenant's
corpus version after every write (``runtime.corpus_version``: the gateway only reads it), which invalidates its
cached answers on every replica; the response carries the version retrieval reported. A write reply with version 0
means retrieval could not advance it: the data is in, but cached answers may be stale until a retry advances it, so
the request fails UNAVAILABLE saying so. A failed write raises its own error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, TypeVar

from prometheus_client import Counter

from services.gateway.chunker import TextChunk, Tokenizer, chunk_text, embed_text
from services.gateway.concurrency import gather_or_cancel
from services.gateway.config import IngestConfig, StageBudgets, default_overlap_cap
from services.gateway.deadlines import Deadline
from services.gateway.response_cache import ResponseCache
from services.gateway.upstreams import RetrievalClient
from services.runtime import telemetry
from services.runtime.embed_client import EmbedClient
from services.runtime.errors import InvalidArgument, Unavailable, require
from services.runtime.limits import (MAX_CHUNK_ID_CHARS, MAX_CHUNK_TEXT_CHARS, MAX_DOC_ID_CHARS,
                                     MAX_TITLE_CHARS, check_metadata, check_text)
from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, retrieval_pb2

log = logging.getLogger("ragfleet.gateway.ingest")
tracer = telemetry.tracer(__name__)

CHUNKS_WRITTEN = Counter("ragfleet_gateway_ingest_chunks_total", "Chunks written to retrieval by Ingest")
DOCUMENTS_INGESTED = Counter("ragfleet_gateway_ingest_documents_total", "Documents ingested")

MIN_CHUNK_TOKENS = 16

T = TypeVar("T")


@dataclass(frozen=True)
class _ChunkedDocument:
    document: gateway_pb2.Document
    chunks: list[TextChunk]


class Ingestor:
    def __init__(self, *, embedding: EmbedClient, retrieval: RetrievalClient, cache: ResponseCache,
                 tokenizer: Tokenizer, config: IngestConfig, budgets: StageBudgets) -> None:
        self.embedding = embedding
        self.retrieval = retrieval
        self.cache = cache
        self.tokenizer = tokenizer
        self.config = config
        self.budgets = budgets

    def validate(self, request: gateway_pb2.IngestRequest) -> tuple[int, int]:
        """Check the request before any work; returns the (chunk_tokens, overlap) to use."""
        config = self.config
        require(len(request.documents) > 0, "documents: at least one document is required")
        require(len(request.documents) <= config.max_documents,
                f"documents: {len(request.documents)} in one request, the limit is {config.max_documents}")
        seen: set[str] = set()
        for i, doc in enumerate(request.documents):
            require(bool(doc.doc_id.strip()), f"documents[{i}].doc_id: must not be empty")
            check_text(doc.doc_id, f"documents[{i}].doc_id", MAX_DOC_ID_CHARS)
            require(doc.doc_id not in seen, f"documents[{i}].doc_id: {doc.doc_id!r} appears twice in one request")
            check_text(doc.text, f"documents[{i}].text (doc_id {doc.doc_id!r})", config.max_document_chars)
            require(bool(doc.text.strip()), f"documents[{i}].text: must not be empty (doc_id {doc.doc_id!r})")
            check_text(doc.title, f"documents[{i}].title (doc_id {doc.doc_id!r})", MAX_TITLE_CHARS)
            check_metadata(doc.metadata, f"documents[{i}].metadata (doc_id {doc.doc_id!r})")
            seen.add(doc.doc_id)
        chunk_tokens = request.chunk_tokens or config.chunk_tokens
        require(MIN_CHUNK_TOKENS <= chunk_tokens <= config.max_chunk_tokens,
                f"chunk_tokens: must be between {MIN_CHUNK_TOKENS} and {config.max_chunk_tokens}, got {chunk_tokens}")
        # The configured overlap is at most a quarter of CHUNK_TOKENS (checked at start-up), so it applies as
        # set; a request with its own smaller chunk_tokens gets it cut to a quarter of those.
        overlap = request.chunk_overlap or min(config.chunk_overlap, default_overlap_cap(chunk_tokens))
        require(0 <= overlap < chunk_tokens,
                f"chunk_overlap: must be >= 0 and smaller than chunk_tokens ({chunk_tokens}), got {overlap}")
        return chunk_tokens, overlap

    async def ingest(self, tenant: str, request: gateway_pb2.IngestRequest,
                     deadline: Deadline) -> gateway_pb2.IngestResponse:
        chunk_tokens, overlap = self.validate(request)
        with tracer.start_as_current_span("gateway.chunk"):
            # Tokenising a large batch takes a while; keep the event loop (other Asks) responsive meanwhile.
            chunked = await asyncio.to_thread(self._chunk_all, list(request.documents), chunk_tokens, overlap)
        self._check_chunks(chunked, chunk_tokens)  # before any embedding is spent
        semaphore = asyncio.Semaphore(self.config.concurrency)
        results = await self._then_invalidate(tenant, gather_or_cancel(
            self._write_group(tenant, group, semaphore, deadline) for group in self._groups(chunked)))
        written = sum(upserted for upserted, _ in results)
        CHUNKS_WRITTEN.inc(written)
        DOCUMENTS_INGESTED.inc(len(chunked))
        log.info("ingested", extra={"fields": {"tenant": tenant, "documents": len(chunked), "chunks": written}})
        version = self._invalidated(tenant, [v for _, v in results],
                                    f"{len(chunked)} document(s) ({written} chunks) were written")
        return gateway_pb2.IngestResponse(documents=len(chunked), chunks_written=written, corpus_version=version)

    async def delete(self, tenant: str, request: gateway_pb2.DeleteDocumentsRequest,
                     deadline: Deadline) -> gateway_pb2.DeleteDocumentsResponse:
        require(len(request.doc_ids) > 0, "doc_ids: at least one doc_id is required")
        require(len(request.doc_ids) <= self.config.max_documents,
                f"doc_ids: {len(request.doc_ids)} ids exceeds the limit of {self.config.max_documents}")
        require(all(d.strip() for d in request.doc_ids), "doc_ids: must not contain empty ids")
        for i, doc_id in enumerate(request.doc_ids):
            check_text(doc_id, f"doc_ids[{i}]", MAX_CHUNK_ID_CHARS)  # as retrieval's Delete (older, longer ids)
        response = await self._then_invalidate(tenant, self.retrieval.delete(
            retrieval_pb2.DeleteRequest(tenant=tenant, doc_ids=request.doc_ids),
            timeout=deadline.budget(self.budgets.ingest, "delete")))
        version = self._invalidated(tenant, [response.corpus_version], f"{response.deleted_chunks} chunks were deleted")
        return gateway_pb2.DeleteDocumentsResponse(deleted_chunks=response.deleted_chunks, corpus_version=version)

    # -- cache invalidation -----------------------------------------------------------------------------------------

    async def _then_invalidate(self, tenant: str, write: Awaitable[T]) -> T:
        """Await the write, telling the cache about it even if it fails (part way, it may still have changed the
        corpus; retrieval advances the version in that case too)."""
        try:
            return await write
        finally:
            self.cache.note_write(tenant)

    def _invalidated(self, tenant: str, versions: list[int], done: str) -> int:
        """The corpus version retrieval reported after a successful write (the highest of its replies). A 0 means a
        write whose version retrieval could not advance (Redis failing): UNAVAILABLE saying the data is in, since
        the client may retry (writes are idempotent) and the retry's write advances it."""
        if 0 in versions:
            log.error("retrieval could not advance the corpus version after a successful write (tenant %s)", tenant)
            raise Unavailable(f"corpus version: {done}, but cached answers could not be invalidated (retrieval "
                              f"could not advance the corpus version); they may be stale until the request is "
                              f"retried (it is idempotent)")
        version = max(versions)
        self.cache.note_version(tenant, version)  # this replica's next Asks see the write without waiting
        return version

    # -- internals --------------------------------------------------------------------------------------------------

    def _chunk_all(self, documents: list[gateway_pb2.Document], chunk_tokens: int,
                   overlap: int) -> list[_ChunkedDocument]:
        return [_ChunkedDocument(doc, chunk_text(self.tokenizer, doc.title, doc.text, chunk_tokens=chunk_tokens,
                                                 overlap=overlap)) for doc in documents]

    def _check_chunks(self, chunked: list[_ChunkedDocument], chunk_tokens: int) -> None:
        """A document retrieval could not store whole is refused here, naming it, before it is embedded."""
        limit = self.config.max_chunks_per_document
        for i, doc in enumerate(chunked):
            doc_id = doc.document.doc_id
            if len(doc.chunks) > limit:
                raise InvalidArgument(
                    f"documents[{i}] (doc_id {doc_id!r}): {len(doc.chunks)} chunks at chunk_tokens={chunk_tokens} "
                    f"exceeds the limit of {limit} chunks per document; split the document or raise chunk_tokens")
            for chunk in doc.chunks:
                # A run without spaces is one tokenizer "word" of any length: its chunk can outgrow retrieval's limit.
                check_text(chunk.text, f"documents[{i}] (doc_id {doc_id!r}) chunk {chunk.index} text",
                           MAX_CHUNK_TEXT_CHARS)

    def _groups(self, chunked: list[_ChunkedDocument]) -> list[list[_ChunkedDocument]]:
        """Pack whole documents into groups of about ``upsert_batch`` chunks (a big document forms its own)."""
        groups: list[list[_ChunkedDocument]] = []
        current: list[_ChunkedDocument] = []
        size = 0
        for doc in chunked:
            if current and size + len(doc.chunks) > self.config.upsert_batch:
                groups.append(current)
                current, size = [], 0
            current.append(doc)
            size += len(doc.chunks)
        if current:
            groups.append(current)
        return groups

    async def _write_group(self, tenant: str, group: list[_ChunkedDocument], semaphore: asyncio.Semaphore,
                           deadline: Deadline) -> tuple[int, int]:
        """Embed one group's chunks in batches, then upsert the group; returns (chunks written, corpus version)."""
        pieces = [(doc, chunk) for doc in group for chunk in doc.chunks]
        texts = [embed_text(doc.document.title, chunk.text) for doc, chunk in pieces]
        batch = self.config.embed_batch

        async def embed(batch_texts: list[str]) -> list[list[float]]:
            async with semaphore:
                response = await self.embedding.embed(batch_texts, input_type=common_pb2.INPUT_TYPE_DOCUMENT,
                                                      timeout=deadline.budget(self.budgets.ingest, "embed"))
            return [list(e.values) for e in response.embeddings]

        batches = await gather_or_cancel(embed(texts[i:i + batch]) for i in range(0, len(texts), batch))
        vectors = [vector for vectors in batches for vector in vectors]
        chunks = [retrieval_pb2.Chunk(chunk_id=f"{doc.document.doc_id}#{chunk.index}", doc_id=doc.document.doc_id,
                                      chunk_index=chunk.index, title=doc.document.title, text=chunk.text,
                                      vector=vector, metadata=doc.document.metadata)
                  for (doc, chunk), vector in zip(pieces, vectors)]
        async with semaphore:
            response = await self.retrieval.upsert(
                retrieval_pb2.UpsertRequest(tenant=tenant, chunks=chunks, replace_documents=True),
                timeout=deadline.budget(self.budgets.ingest, "upsert"))
        if response.failed_chunk_ids:
            raise Unavailable(f"retrieval service: {len(response.failed_chunk_ids)} of {len(chunks)} chunks were not "
                              f"written (e.g. {response.failed_chunk_ids[0]!r}); ingest is idempotent, retry it")
        return response.upserted, response.corpus_version
