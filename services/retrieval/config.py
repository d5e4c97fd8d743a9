"""Typed configuration of the retrieval service, read once from RAGFLEET_RETRIEVAL_* variables.

| variable | default | meaning |
|---|---|---|
| RAGFLEET_RETRIEVAL_STORE | edge | `edge` (embedded qdrant-edge under RAGFLEET_DATA_DIR/retrieval) or `remote` (Qdrant server) |
| RAGFLEET_RETRIEVAL_QDRANT_URL | http://127.0.0.1:6333 | Qdrant server for the remote store: http(s)://host:port (`:memory:` = qdrant-client local mode) |
| RAGFLEET_RETRIEVAL_QDRANT_GRPC_PORT | 6334 | gRPC port of that server (the client prefers gRPC) |
| RAGFLEET_RETRIEVAL_QDRANT_API_KEY | unset | API key for the Qdrant server |
| RAGFLEET_RETRIEVAL_COLLECTION | ragfleet_chunks | collection name on the Qdrant server |
| RAGFLEET_RETRIEVAL_DIMENSION | 384 | dense vector size; must match the embedding model (all-MiniLM-L6-v2 = 384) |
| RAGFLEET_RETRIEVAL_MAX_TOP_K | 100 | largest accepted `top_k` |
| RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT | 2048 | largest accepted Upsert batch |
| RAGFLEET_RETRIEVAL_MAX_QUERY_CHARS | 4096 | longest accepted query text |
| RAGFLEET_RETRIEVAL_DEFAULT_MODE | hybrid | mode used when a request leaves it unspecified (dense, sparse, hybrid) |
| RAGFLEET_RETRIEVAL_CANDIDATES | 100 | candidates fetched per leg before fusion, rerank and MMR |
| RAGFLEET_RETRIEVAL_RRF_K | 60 | reciprocal rank fusion constant k |
| RAGFLEET_RETRIEVAL_RERANK | fusion | reranker: `none`, `fusion` (dense cosine + BM25 rescoring), `tei` (HTTP /rerank), `onnx` (local cross-encoder) |
| RAGFLEET_RETRIEVAL_RERANK_DEFAULT | true | rerank when the request leaves `rerank` unset |
| RAGFLEET_RETRIEVAL_RERANK_CANDIDATES | 30 | rerank depth: the top fused candidates the reranker reorders (the rest follow in fused order) |
| RAGFLEET_RETRIEVAL_RERANK_ALPHA | 0.5 | weight of dense cosine vs normalised BM25 in the fusion rescorer (0.5 and depth 30 were best on SciFact train) |
| RAGFLEET_RETRIEVAL_RERANK_URL | unset | base URL of a text-embeddings-inference compatible reranker (`tei`) |
| RAGFLEET_RETRIEVAL_RERANK_MODEL_DIR | unset | directory with `model.onnx` + `tokenizer.json` of a cross-encoder (`onnx`) |
| RAGFLEET_RETRIEVAL_RERANK_TIMEOUT_SECONDS | 2.0 | deadline of one rerank call |
| RAGFLEET_RETRIEVAL_MMR_CANDIDATES | 50 | candidates MMR chooses from |
| RAGFLEET_RETRIEVAL_BM25_AVG_LEN | 200 | expected document length (tokens) for BM25 length normalisation |
| RAGFLEET_RETRIEVAL_BM25_K1 / _BM25_B | 1.2 / 0.75 | BM25 term-frequency saturation and length normalisation |
| RAGFLEET_RETRIEVAL_HNSW_M / _HNSW_EF_CONSTRUCT / _HNSW_EF | 16 / 128 / 128 | HNSW graph degree, build breadth, default search breadth |
| RAGFLEET_RETRIEVAL_INDEXING_THRESHOLD_KB | 2000 | segments larger than this get an HNSW index (smaller ones are searched exactly) |
| RAGFLEET_RETRIEVAL_QUANTIZATION | none | `int8` enables scalar quantization (searched with rescoring on the original vectors) |
| RAGFLEET_RETRIEVAL_OPTIMIZE_IDLE_SECONDS | 2.0 | build HNSW once no write arrived for this long (0 disables background optimize) |
| RAGFLEET_RETRIEVAL_EMBEDDING_ADDRESS | unset | embedding service for queries that carry text but no vector; unset = sparse-only for those |
| RAGFLEET_RETRIEVAL_EMBEDDING_TIMEOUT_SECONDS | 5.0 | deadline of one Embed call |
| RAGFLEET_RETRIEVAL_FILTER_FIELDS | * | metadata keys a filter may name besides doc_id/title/chunk_index; `*` = any key |
| RAGFLEET_RETRIEVAL_CACHE_SIZE | 2048 | L1 (in-process) result cache entries; 0 disables the cache |
| RAGFLEET_RETRIEVAL_CACHE_TTL_SECONDS | 600 | lifetime of cached results (L1 and Redis L2) |
| RAGFLEET_REDIS_URL | unset | shared Redis: L2 result cache and the per-tenant corpus versions all replicas agree on |
| RAGFLEET_DATA_DIR | .ragfleet | the embedded store lives in `<data dir>/retrieval` |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from services.runtime.config import Env, ServerConfig, data_dir, redis_url
from services.runtime.errors import ConfigError

DEFAULT_DIMENSION = 384  # all-MiniLM-L6-v2
DEFAULT_MAX_TOP_K = 100
DEFAULT_RRF_K = 60
STORES = ("edge", "remote")
MODES = ("dense", "sparse", "hybrid")
RERANKERS = ("none", "fusion", "tei", "onnx")
QUANTIZATIONS = ("none", "int8")
LOCAL_QDRANT_URL = ":memory:"  # qdrant-client's in-process mode (tests); everything else must be a server URL


def check_qdrant_url(url: str) -> str:
    """Refuse anything but an http(s) URL or ":memory:": qdrant-client reads any other string as a local directory,
    so "qdrant:6333" would silently give every replica a private, empty on-disk database."""
    if url != LOCAL_QDRANT_URL and not url.startswith(("http://", "https://")):
        raise ConfigError(f"RAGFLEET_RETRIEVAL_QDRANT_URL={url!r} must start with http:// or https:// (e.g. "
                          f"http://qdrant:6333), or be {LOCAL_QDRANT_URL} for qdrant-client's in-process mode")
    return url


@dataclass(frozen=True)
class IndexConfig:
    """How the dense index is built and searched (both stores)."""

    dimension: int = DEFAULT_DIMENSION
    hnsw_m: int = 16
    hnsw_ef_construct: int = 128
    hnsw_ef: int = 128
    indexing_threshold_kb: int = 2000
    quantization: str = "none"
    optimize_idle_seconds: float = 2.0
    # Filters keeping at most this share of the points (a big tenant) search with ACORN: a filtered HNSW walk also
    # steps through neighbours of neighbours. Qdrant adds per-value links only for values under ~1/6 of a segment,
    # so without it a 30 % tenant's recall@10 fell to 0.52-0.88 at ef 64 (bench/retrieval_speed.py). 0 = never.
    acorn_max_selectivity: float = 0.4


@dataclass(frozen=True)
class Bm25Settings:
    k1: float = 1.2
    b: float = 0.75
    avg_len: float = 200.0


@dataclass(frozen=True)
class SearchSettings:
    """Limits and defaults of the search pipeline."""

    max_top_k: int = DEFAULT_MAX_TOP_K
    max_chunks_per_upsert: int = 2048
    max_query_chars: int = 4096
    default_mode: str = "hybrid"
    candidates: int = 100
    rrf_k: int = DEFAULT_RRF_K
    rerank_default: bool = True
    rerank_candidates: int = 30
    mmr_candidates: int = 50
    filter_fields: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class RerankSettings:
    kind: str = "fusion"
    alpha: float = 0.5
    url: str | None = None
    model_dir: str | None = None
    timeout_seconds: float = 2.0


@dataclass(frozen=True)
class CacheSettings:
    size: int = 2048
    ttl_seconds: float = 600.0
    redis_url: str | None = None


@dataclass(frozen=True)
class RetrievalConfig:
    server: ServerConfig
    store: str = "edge"
    data_dir: str = os.path.join(".ragfleet", "retrieval")
    qdrant_url: str = "http://127.0.0.1:6333"
    qdrant_grpc_port: int = 6334
    qdrant_api_key: str | None = None
    collection: str = "ragfleet_chunks"
    embedding_address: str | None = None
    embedding_timeout_seconds: float = 5.0
    index: IndexConfig = field(default_factory=IndexConfig)
    bm25: Bm25Settings = field(default_factory=Bm25Settings)
    search: SearchSettings = field(default_factory=SearchSettings)
    rerank: RerankSettings = field(default_factory=RerankSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RetrievalConfig":
        env = Env("RAGFLEET_RETRIEVAL_", environ)
        store = _choice(env, "STORE", "edge", STORES)
        mode = _choice(env, "DEFAULT_MODE", "hybrid", MODES)
        rerank = _choice(env, "RERANK", "fusion", RERANKERS)
        quantization = _choice(env, "QUANTIZATION", "none", QUANTIZATIONS)
        rerank_url = env.optional_str("RERANK_URL")
        model_dir = env.optional_str("RERANK_MODEL_DIR")
        if rerank == "tei" and not rerank_url:
            raise ConfigError("RAGFLEET_RETRIEVAL_RERANK=tei needs RAGFLEET_RETRIEVAL_RERANK_URL")
        if rerank == "onnx" and not model_dir:
            raise ConfigError("RAGFLEET_RETRIEVAL_RERANK=onnx needs RAGFLEET_RETRIEVAL_RERANK_MODEL_DIR")
        alpha = env.float("RERANK_ALPHA", 0.5, minimum=0.0)
        if alpha > 1.0:
            raise ConfigError(f"RAGFLEET_RETRIEVAL_RERANK_ALPHA={alpha} must be in [0, 1]")
        acorn = env.float("ACORN_MAX_SELECTIVITY", 0.4, minimum=0.0)
        if acorn > 1.0:
            raise ConfigError(f"RAGFLEET_RETRIEVAL_ACORN_MAX_SELECTIVITY={acorn} must be in [0, 1] (0 turns ACORN off)")
        qdrant_url = env.str("QDRANT_URL", "http://127.0.0.1:6333")
        if store == "remote":
            check_qdrant_url(qdrant_url)
        return cls(
            server=ServerConfig.from_env("retrieval", environ),
            store=store,
            data_dir=os.path.join(data_dir(environ), "retrieval"),
            qdrant_url=qdrant_url,
            qdrant_grpc_port=env.int("QDRANT_GRPC_PORT", 6334, minimum=1),
            qdrant_api_key=env.optional_str("QDRANT_API_KEY"),
            collection=env.str("COLLECTION", "ragfleet_chunks"),
            embedding_address=env.optional_str("EMBEDDING_ADDRESS"),
            embedding_timeout_seconds=env.float("EMBEDDING_TIMEOUT_SECONDS", 5.0, minimum=0.01),
            index=IndexConfig(
                dimension=env.int("DIMENSION", DEFAULT_DIMENSION, minimum=1),
                hnsw_m=env.int("HNSW_M", 16, minimum=4),
                hnsw_ef_construct=env.int("HNSW_EF_CONSTRUCT", 128, minimum=4),
                hnsw_ef=env.int("HNSW_EF", 128, minimum=1),
                indexing_threshold_kb=env.int("INDEXING_THRESHOLD_KB", 2000, minimum=1),
                quantization=quantization,
                optimize_idle_seconds=env.float("OPTIMIZE_IDLE_SECONDS", 2.0, minimum=0.0),
                acorn_max_selectivity=acorn,
            ),
            bm25=Bm25Settings(k1=env.float("BM25_K1", 1.2, minimum=0.0), b=env.float("BM25_B", 0.75, minimum=0.0),
                              avg_len=env.float("BM25_AVG_LEN", 200.0, minimum=1.0)),
            search=SearchSettings(
                max_top_k=env.int("MAX_TOP_K", DEFAULT_MAX_TOP_K, minimum=1),
                max_chunks_per_upsert=env.int("MAX_CHUNKS_PER_UPSERT", 2048, minimum=1),
                max_query_chars=env.int("MAX_QUERY_CHARS", 4096, minimum=1),
                default_mode=mode,
                candidates=env.int("CANDIDATES", 100, minimum=1),
                rrf_k=env.int("RRF_K", DEFAULT_RRF_K, minimum=1),
                rerank_default=env.bool("RERANK_DEFAULT", True),
                rerank_candidates=env.int("RERANK_CANDIDATES", 30, minimum=1),
                mmr_candidates=env.int("MMR_CANDIDATES", 50, minimum=1),
                filter_fields=env.list("FILTER_FIELDS", ("*",)),
            ),
            rerank=RerankSettings(kind=rerank, alpha=alpha, url=rerank_url, model_dir=model_dir,
                                  timeout_seconds=env.float("RERANK_TIMEOUT_SECONDS", 2.0, minimum=0.01)),
            cache=CacheSettings(size=env.int("CACHE_SIZE", 2048, minimum=0),
                                ttl_seconds=env.float("CACHE_TTL_SECONDS", 600.0, minimum=1.0),
                                redis_url=redis_url(environ)),
        )


def _choice(env: Env, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.str(name, default).lower()
    if value not in choices:
        raise ConfigError(f"{env.prefix}{name}={value!r} must be one of {', '.join(choices)}")
    return value
