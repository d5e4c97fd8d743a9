"""Request validation and conversion to domain objects. Every message names the field and the limit."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from services.retrieval.config import SearchConfig
from services.retrieval.models import BUILTIN_FILTER_FIELDS, META, META_NUM, ChunkRecord, Condition
from services.retrieval.search import SearchQuery
from services.retrieval.sparse import Bm25Encoder
from services.runtime.errors import InvalidArgument, require
from services.runtime.limits import (MAX_ANY_OF, MAX_CHUNK_ID_CHARS, MAX_CHUNK_TEXT_CHARS, MAX_DOC_ID_CHARS,
                                     MAX_DOC_IDS_PER_DELETE, MAX_FILTERS, MAX_TITLE_CHARS, check_filters,
                                     check_metadata, check_text, check_vector)
from services.runtime.pb.ragfleet.v1 import common_pb2, retrieval_pb2

MAX_TENANT_CHARS = 128
MAX_HNSW_EF = 4096
# Metadata keys a filter can address: one JSON-path key. The engine rejects spaces, ":", "/", "$", "." etc. as an
# invalid path (and "[" would address array elements, not a key), so only word characters (any script) and "-".
_FILTER_FIELD = re.compile(r"[\w-]+")
_MODES = {common_pb2.SEARCH_MODE_DENSE: "dense", common_pb2.SEARCH_MODE_SPARSE: "sparse",
          common_pb2.SEARCH_MODE_HYBRID: "hybrid"}


@dataclass(frozen=True)
class Limits:
    dimension: int
    search: SearchConfig


def tenant_of(tenant: str) -> str:
    require(bool(tenant.strip()), "tenant: required (a non-empty string naming the caller's tenant)")
    require(len(tenant) <= MAX_TENANT_CHARS, f"tenant: at most {MAX_TENANT_CHARS} characters, got {len(tenant)}")
    return tenant


def _vector(values: Sequence[float], field: str, dimension: int) -> np.ndarray:
    require(len(values) == dimension, f"{field}: has {len(values)} values, expected {dimension} "
                                      f"(RAGFLEET_RETRIEVAL_DIMENSION)")
    return check_vector(values, field, dimension)


def upsert_records(request: retrieval_pb2.UpsertRequest, limits: Limits, encoder: Bm25Encoder) -> list[ChunkRecord]:
    tenant = tenant_of(request.tenant)
    n = len(request.chunks)
    require(n > 0, "chunks: at least one chunk is required")
    require(n <= limits.search.max_chunks_per_upsert,
            f"chunks: at most {limits.search.max_chunks_per_upsert} per request "
            f"(RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT), got {n}")
    seen: set[tuple[str, int]] = set()
    records = []
    for i, chunk in enumerate(request.chunks):
        field = f"chunks[{i}]"
        require(bool(chunk.doc_id), f"{field}.doc_id: required")
        check_text(chunk.doc_id, f"{field}.doc_id", MAX_DOC_ID_CHARS)
        check_text(chunk.chunk_id, f"{field}.chunk_id", MAX_CHUNK_ID_CHARS)
        check_text(chunk.title, f"{field}.title", MAX_TITLE_CHARS)
        require(chunk.chunk_index >= 0, f"{field}.chunk_index: must be >= 0, got {chunk.chunk_index}")
        check_text(chunk.text, f"{field}.text", MAX_CHUNK_TEXT_CHARS)
        require(bool(chunk.text.strip()), f"{field}.text: required (non-empty)")
        check_metadata(chunk.metadata, f"{field}.metadata")
        key = (chunk.doc_id, chunk.chunk_index)
        require(key not in seen, f"{field}: duplicate (doc_id={chunk.doc_id!r}, chunk_index={chunk.chunk_index}) "
                                 f"in one request")
        seen.add(key)
        vector = _vector(chunk.vector, f"{field}.vector", limits.dimension)
        # Title words count for BM25 too: titles carry much of a scientific abstract's vocabulary.
        lexical = f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text
        records.append(ChunkRecord(tenant=tenant, chunk_id=chunk.chunk_id or f"{chunk.doc_id}#{chunk.chunk_index}",
                                   doc_id=chunk.doc_id, chunk_index=chunk.chunk_index, title=chunk.title,
                                   text=chunk.text, vector=vector.tolist(), sparse=encoder.document(lexical),
                                   metadata=dict(chunk.metadata)))
    return records


def doc_ids_of(request: retrieval_pb2.DeleteRequest) -> list[str]:
    require(len(request.doc_ids) > 0, "doc_ids: at least one document id is required")
    require(len(request.doc_ids) <= MAX_DOC_IDS_PER_DELETE,
            f"doc_ids: {len(request.doc_ids)} ids exceeds the limit of {MAX_DOC_IDS_PER_DELETE}")
    for i, doc_id in enumerate(request.doc_ids):
        require(bool(doc_id), f"doc_ids[{i}]: must be non-empty")
        check_text(doc_id, f"doc_ids[{i}]", MAX_CHUNK_ID_CHARS)  # lenient: ids stored before the 256 limit
    return list(dict.fromkeys(request.doc_ids))


def _conditions(filters: Sequence[common_pb2.FieldCondition], allowed: tuple[str, ...]) -> tuple[Condition, ...]:
    require(len(filters) <= MAX_FILTERS, f"filters: at most {MAX_FILTERS} conditions, got {len(filters)}")
    check_filters(filters)
    out = []
    for i, cond in enumerate(filters):
        field = f"filters[{i}].field"
        name = cond.field
        require(bool(name), f"{field}: required")
        ranged = cond.HasField("gte") or cond.HasField("lte")
        require(bool(cond.any_of) or ranged, f"filters[{i}]: needs any_of or a gte/lte bound")
        require(len(cond.any_of) <= MAX_ANY_OF, f"filters[{i}].any_of: at most {MAX_ANY_OF} values")
        for bound in ("gte", "lte"):
            require(not (cond.HasField(bound) and math.isnan(getattr(cond, bound))),
                    f"filters[{i}].{bound}: must be a number, got NaN")
        if name in BUILTIN_FILTER_FIELDS:
            require(not ranged or name == "chunk_index", f"filters[{i}]: range bounds only apply to numeric fields")
            path = BUILTIN_FILTER_FIELDS[name]
            values = tuple(cond.any_of)
            if name == "chunk_index" and values:
                raise InvalidArgument(f"filters[{i}].any_of: chunk_index takes gte/lte bounds, not any_of")
            out.append(Condition(path, values, cond.gte if cond.HasField("gte") else None,
                                 cond.lte if cond.HasField("lte") else None))
            continue
        known = "*" in allowed or name in allowed
        require(known and name != "tenant",
                f"{field}: unknown filter field {name!r}; allowed: doc_id, title, chunk_index"
                + ("" if "*" in allowed else ", " + ", ".join(allowed)) + " (RAGFLEET_RETRIEVAL_FILTER_FIELDS)")
        require(_FILTER_FIELD.fullmatch(name) is not None,
                f"{field}: {name!r} cannot be filtered on; a filter field may contain only letters, digits, "
                f"'_' and '-' (no spaces, '.', ':', '/', '$' or brackets)")
        if cond.any_of:
            out.append(Condition(f"{META}.{name}", tuple(cond.any_of)))
        if ranged:
            out.append(Condition(f"{META_NUM}.{name}", (), cond.gte if cond.HasField("gte") else None,
                                 cond.lte if cond.HasField("lte") else None))
    return tuple(out)


def search_query(request: retrieval_pb2.SearchRequest, limits: Limits, *, default_rerank: bool) -> SearchQuery:
    settings = limits.search
    tenant = tenant_of(request.tenant)
    require(1 <= request.top_k <= settings.max_top_k,
            f"top_k: must be between 1 and {settings.max_top_k} (RAGFLEET_RETRIEVAL_MAX_TOP_K), got {request.top_k}")
    text = request.query_text.strip()
    require(bool(text) or len(request.query_vector) > 0,
            "query_text, query_vector: at least one is required (neither was given)")
    require(len(text) <= settings.max_query_chars,
            f"query_text: at most {settings.max_query_chars} characters (RAGFLEET_RETRIEVAL_MAX_QUERY_CHARS), "
            f"got {len(text)}")
    vector = _vector(request.query_vector, "query_vector", limits.dimension) if request.query_vector else None
    if request.mode == common_pb2.SEARCH_MODE_UNSPECIFIED:
        mode = settings.default_mode
    else:
        require(request.mode in _MODES, f"mode: unknown value {request.mode}")
        mode = _MODES[request.mode]
    if mode == "sparse":
        require(bool(text), "query_text: required for mode SPARSE")
    if mode == "dense" and vector is None:
        require(bool(text), "query_vector: required for mode DENSE when query_text is empty")
    mmr_lambda = None
    if request.HasField("mmr_lambda"):
        mmr_lambda = float(request.mmr_lambda)
        require(not math.isnan(mmr_lambda) and 0.0 <= mmr_lambda <= 1.0,
                f"mmr_lambda: must be in [0, 1], got {request.mmr_lambda}")
    require(request.max_context_tokens >= 0, f"max_context_tokens: must be >= 0, got {request.max_context_tokens}")
    require(0 <= request.hnsw_ef <= MAX_HNSW_EF, f"hnsw_ef: must be between 0 and {MAX_HNSW_EF}, got "
                                                 f"{request.hnsw_ef}")
    return SearchQuery(tenant=tenant, text=text, vector=vector, top_k=request.top_k,
                       conditions=_conditions(request.filters, settings.filter_fields), mode=mode,
                       rerank=request.rerank if request.HasField("rerank") else default_rerank,
                       mmr_lambda=mmr_lambda, max_tokens=request.max_context_tokens,
                       hnsw_ef=request.hnsw_ef or None)
