"""Remote store: a Qdrant server (the deployment's StatefulSet) through qdrant-client, preferring gRPC.

`url=":memory:"` runs qdrant-client's local mode (same client API, exact search) -- how the tests exercise this
store, since no Qdrant server can run here; any other url must be http(s)://. One collection holds every tenant;
`tenant` is a tenant-keyed payload index, so Qdrant co-locates each tenant's points and filters on it cheaply.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from qdrant_client import AsyncQdrantClient, models

from services.retrieval.config import LOCAL_QDRANT_URL, IndexConfig, check_qdrant_url
from services.retrieval.models import DOC_ID, TENANT, Candidate, ChunkRecord, Condition, IndexStatus, SparseVec
from services.retrieval.store.base import DENSE, SPARSE, StoreError, StoreStartupError, VectorStore

log = logging.getLogger("ragfleet.retrieval.remote")


def _filter(tenant: str, conditions: Sequence[Condition], *, must: Sequence[Any] = (),
            must_not: list[Any] | None = None) -> models.Filter:
    must = [models.FieldCondition(key=TENANT, match=models.MatchValue(value=tenant)), *must]
    for cond in conditions:
        if cond.any_of:
            must.append(models.FieldCondition(key=cond.path, match=models.MatchAny(any=list(cond.any_of))))
        if cond.gte is not None or cond.lte is not None:
            must.append(models.FieldCondition(key=cond.path, range=models.Range(gte=cond.gte, lte=cond.lte)))
    return models.Filter(must=must, must_not=must_not)


def _detail(record: models.Record) -> Candidate:
    vectors = record.vector if isinstance(record.vector, dict) else {}
    vector = vectors.get(DENSE)
    if vector is not None:
        vector = np.asarray(vector, dtype=np.float32)
        vector /= max(float(np.linalg.norm(vector)), 1e-12)  # local mode keeps the raw vector, the server a unit one
    return Candidate(str(record.id), 0.0, record.payload or {}, vector)


class RemoteStore(VectorStore):
    name = "remote"

    def __init__(self, *, url: str, collection: str, index: IndexConfig, grpc_port: int = 6334,
                 api_key: str | None = None) -> None:
        self.url = url
        self.collection = collection
        self.index = index
        check_qdrant_url(url)
        self._local = url == LOCAL_QDRANT_URL
        if self._local:
            self.client = AsyncQdrantClient(location=LOCAL_QDRANT_URL)
        else:
            self.client = AsyncQdrantClient(url=url, grpc_port=grpc_port, prefer_grpc=True, api_key=api_key,
                                            timeout=10)

    async def start(self) -> None:
        try:
            if await self.client.collection_exists(self.collection):
                info = await self.client.get_collection(self.collection)
                vectors = info.config.params.vectors
                size = vectors[DENSE].size if isinstance(vectors, dict) and DENSE in vectors else None
                if size != self.index.dimension:
                    raise StoreStartupError(f"Qdrant collection {self.collection!r} has dense size {size}, "
                                            f"expected {self.index.dimension}; refusing to touch it")
                return
            quantization = None
            if self.index.quantization == "int8":
                quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
                    type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
            await self.client.create_collection(
                self.collection,
                vectors_config={DENSE: models.VectorParams(size=self.index.dimension, distance=models.Distance.COSINE)},
                sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                hnsw_config=models.HnswConfigDiff(m=self.index.hnsw_m, ef_construct=self.index.hnsw_ef_construct),
                optimizers_config=models.OptimizersConfigDiff(indexing_threshold=self.index.indexing_threshold_kb),
                quantization_config=quantization,
            )
            if not self._local:  # local mode has no payload indexes (and says so with a warning)
                await self.client.create_payload_index(
                    self.collection, TENANT, models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD,
                                                                       is_tenant=True), wait=True)
                await self.client.create_payload_index(self.collection, DOC_ID, models.PayloadSchemaType.KEYWORD,
                                                       wait=True)
        except StoreStartupError:
            raise
        except Exception as exc:
            raise StoreStartupError(f"Qdrant at {self.url} (collection {self.collection!r}) cannot be opened: "
                                    f"{exc}") from exc

    async def _write(self, records: Sequence[ChunkRecord]) -> None:
        try:
            points = [models.PointStruct(id=r.point_id, payload=r.payload(), vector={
                DENSE: list(r.vector), SPARSE: models.SparseVector(indices=r.sparse.indices, values=r.sparse.values)})
                for r in records]
        except (TypeError, ValueError) as exc:  # a point the client cannot represent fails alone, as a StoreError
            raise StoreError(f"Qdrant client rejected a point: {exc}") from exc
        await self._call("upsert", self.client.upsert(self.collection, points=points, wait=True))

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except Exception as exc:
            raise StoreError(f"Qdrant at {self.url} failed to {what}: {exc}") from exc

    async def delete_documents(self, tenant: str, doc_ids: Sequence[str],
                               keep_point_ids: Sequence[str] = ()) -> int:
        must_not = [models.HasIdCondition(has_id=list(keep_point_ids))] if keep_point_ids else None
        flt = _filter(tenant, [Condition(DOC_ID, tuple(doc_ids))], must_not=must_not)
        counted = await self._call("count", self.client.count(self.collection, count_filter=flt, exact=True))
        if counted.count:
            await self._call("delete", self.client.delete(self.collection, models.FilterSelector(filter=flt),
                                                          wait=True))
        return counted.count

    def _params(self, hnsw_ef: int | None, exact: bool) -> models.SearchParams | None:
        if self._local:
            return None  # local mode is exact and warns about index parameters
        quant = None
        if self.index.quantization == "int8":
            quant = models.QuantizationSearchParams(rescore=True, oversampling=2.0)
        acorn = None
        if self.index.acorn_max_selectivity > 0:
            acorn = models.AcornSearchParams(enable=True, max_selectivity=self.index.acorn_max_selectivity)
        return models.SearchParams(hnsw_ef=hnsw_ef or self.index.hnsw_ef, exact=exact, quantization=quant,
                                   acorn=acorn)

    async def dense(self, tenant: str, vector: Sequence[float], limit: int, conditions: Sequence[Condition],
                    *, hnsw_ef: int | None = None, exact: bool = False) -> list[Candidate]:
        reply = await self._call("search", self.client.query_points(
            self.collection, query=list(vector), using=DENSE, query_filter=_filter(tenant, conditions), limit=limit,
            with_payload=False, search_params=self._params(hnsw_ef, exact)))
        return [Candidate(str(p.id), float(p.score), {}) for p in reply.points]

    async def sparse(self, tenant: str, query: SparseVec, limit: int,
                     conditions: Sequence[Condition]) -> list[Candidate]:
        if not query.indices:
            return []
        # IDF over this tenant's points only (as in the embedded store).
        params = models.SearchParams(idf=models.IdfCorpusParams(corpus=_filter(tenant, ())))
        reply = await self._call("search", self.client.query_points(
            self.collection, query=models.SparseVector(indices=query.indices, values=query.values), using=SPARSE,
            query_filter=_filter(tenant, conditions), limit=limit, with_payload=False, search_params=params))
        return [Candidate(str(p.id), float(p.score), {}) for p in reply.points]

    async def fetch(self, tenant: str, point_ids: Sequence[str], *, with_vectors: bool) -> dict[str, Candidate]:
        if not point_ids:
            return {}
        records, _ = await self._call("fetch", self.client.scroll(
            self.collection, scroll_filter=_filter(tenant, (), must=[models.HasIdCondition(has_id=list(point_ids))]),
            limit=len(point_ids), with_payload=True, with_vectors=[DENSE] if with_vectors else False))
        return {c.point_id: c for c in map(_detail, records)}

    async def count(self, tenant: str) -> int:
        reply = await self._call("count", self.client.count(self.collection, count_filter=_filter(tenant, ()),
                                                            exact=True))
        return reply.count

    async def status(self) -> IndexStatus:
        info = await self._call("read collection info", self.client.get_collection(self.collection))
        points = info.points_count or 0
        state = {"green": "indexed", "yellow": "optimizing", "grey": "exact"}.get(str(info.status.value), "exact")
        if self._local:
            state = "exact"
        return IndexStatus(self.name, points, info.indexed_vectors_count or 0, info.segments_count or 0,
                           "empty" if points == 0 else state)

    async def close(self) -> None:
        await self.client.close()
