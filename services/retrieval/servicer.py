"""RetrievalService: Upsert / Delete / Search over one VectorStore, with the result cache in front of Search."""

from __future__ import annotations

import logging

import grpc

from services.retrieval import metrics
from services.retrieval.cache import ResultCache
from services.retrieval.models import (CHUNK_ID, CHUNK_INDEX, DOC_ID, META, TEXT, TITLE, Candidate, ChunkRecord)
from services.retrieval.search import SearchPipeline
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store.base import StoreError, VectorStore
from services.retrieval.validation import Limits, doc_ids_of, search_query, tenant_of, upsert_records
from services.runtime.errors import Unavailable
from services.runtime.pb.ragfleet.v1 import retrieval_pb2, retrieval_pb2_grpc

log = logging.getLogger("ragfleet.retrieval")


def _hit(cand: Candidate) -> retrieval_pb2.SearchHit:
    p = cand.payload
    return retrieval_pb2.SearchHit(chunk_id=str(p.get(CHUNK_ID, "")), doc_id=str(p.get(DOC_ID, "")),
                                   chunk_index=int(p.get(CHUNK_INDEX, 0)), title=str(p.get(TITLE, "")),
                                   text=str(p.get(TEXT, "")), score=cand.score,
                                   metadata={str(k): str(v) for k, v in (p.get(META) or {}).items()})


class RetrievalServiceServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, *, store: VectorStore, pipeline: SearchPipeline, cache: ResultCache, encoder: Bm25Encoder,
                 limits: Limits, rerank_default: bool) -> None:
        self.store = store
        self.pipeline = pipeline
        self.cache = cache
        self.encoder = encoder
        self.limits = limits
        self.rerank_default = rerank_default

    async def Upsert(self, request: retrieval_pb2.UpsertRequest,
                     context: grpc.aio.ServicerContext) -> retrieval_pb2.UpsertResponse:
        records: list[ChunkRecord] = upsert_records(request, self.limits, self.encoder)
        tenant = records[0].tenant
        changed = True  # until the store reports otherwise: a failure may follow batches already written
        try:
            result = await self.store.upsert(records)
            changed = bool(result.written)
            metrics.UPSERTED.inc(len(result.written))
            if result.failed:
                metrics.UPSERT_FAILED.inc(len(result.failed))
                log.warning("upsert partly failed", extra={"fields": {"tenant": tenant,
                                                                      "written": len(result.written),
                                                                      "failed": len(result.failed),
                                                                      "cause": result.error}})
            elif request.replace_documents:
                # Only after every new chunk is in: a re-ingest with fewer chunks drops the leftovers, never the doc.
                keep = [r.point_id for r in records]
                try:
                    removed = await self.store.delete_documents(tenant, sorted({r.doc_id for r in records}), keep)
                except StoreError as exc:
                    raise Unavailable(f"retrieval store: new chunks were written but stale ones were not removed: "
                                      f"{exc}") from exc
                metrics.DELETED.inc(removed)
        finally:
            # Bump after the engine accepted the write, and whenever it may have changed the corpus (partial writes,
            # a failed delete, an error): a cached answer must never outlive a change.
            version = await self.cache.bump(tenant) if changed else await self.cache.version(tenant)
        if not result.written and result.failed:
            raise Unavailable(f"retrieval store: nothing was written: {result.error}")
        return retrieval_pb2.UpsertResponse(upserted=len(result.written), corpus_version=version or 0,
                                            failed_chunk_ids=result.failed)

    async def Delete(self, request: retrieval_pb2.DeleteRequest,
                     context: grpc.aio.ServicerContext) -> retrieval_pb2.DeleteResponse:
        tenant = tenant_of(request.tenant)
        doc_ids = doc_ids_of(request)
        try:
            removed = await self._store_call(self.store.delete_documents(tenant, doc_ids))
        finally:
            version = await self.cache.bump(tenant)  # even a failed delete may have removed points
        metrics.DELETED.inc(removed)
        return retrieval_pb2.DeleteResponse(deleted_chunks=removed, corpus_version=version or 0)

    async def Search(self, request: retrieval_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        query = search_query(request, self.limits, default_rerank=self.rerank_default)
        key = None
        version = await self.cache.version(query.tenant) if self.cache.enabled else None
        if request.bypass_cache or version is None:
            metrics.CACHE.labels("bypass").inc()
        else:
            fingerprint = retrieval_pb2.SearchRequest()
            fingerprint.CopyFrom(request)
            fingerprint.ClearField("bypass_cache")
            key = self.cache.key(query.tenant, version, fingerprint.SerializeToString(deterministic=True))
            cached, result = await self.cache.get(key)
            metrics.CACHE.labels(result).inc()
            if cached is not None:
                response = retrieval_pb2.SearchResponse.FromString(cached)
                response.cached = True
                return response
        outcome = await self._store_call(self.pipeline.run(query))
        response = retrieval_pb2.SearchResponse(hits=[_hit(c) for c in outcome.hits], corpus_version=version or 0,
                                                timings_ms=outcome.timings_ms)
        if key is not None:
            await self.cache.put(key, response.SerializeToString())
        return response

    @staticmethod
    async def _store_call(awaitable):  # type: ignore[no-untyped-def]
        try:
            return await awaitable
        except StoreError as exc:
            raise Unavailable(f"retrieval store: {exc}") from exc
