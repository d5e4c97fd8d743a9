"""Typed configuration of the retrieval service: its RAGFLEET_RETRIEVAL_* variables, each declared once below (the
README's retrieval table is generated from them by scripts/gen_config_docs.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from services.runtime.config import DATA_DIR, REDIS_URL, Env, ServerConfig, declare
from services.runtime.errors import ConfigError

STORES = ("edge", "remote")
MODES = ("dense", "sparse", "hybrid")
RERANKERS = ("none", "fusion", "tei", "onnx")
QUANTIZATIONS = ("none", "int8")
LOCAL_QDRANT_URL = ":memory:"  # qdrant-client's in-process mode (tests); everything else must be a server URL

STORE = declare("RAGFLEET_RETRIEVAL_STORE", str, "edge",
                "`edge` (embedded qdrant-edge under RAGFLEET_DATA_DIR/retrieval) or `remote` (Qdrant server)",
                choices=STORES)
QDRANT_URL = declare("RAGFLEET_RETRIEVAL_QDRANT_URL", str, "http://127.0.0.1:6333",
                     "Qdrant server for the remote store, `http(s)://host:port` (anything else fails start-up; "
                     "`:memory:` = qdrant-client local mode)")
QDRANT_GRPC_PORT = declare("RAGFLEET_RETRIEVAL_QDRANT_GRPC_PORT", int, 6334,
                           "gRPC port of that server (the client prefers gRPC)", minimum=1)
QDRANT_API_KEY = declare("RAGFLEET_RETRIEVAL_QDRANT_API_KEY", str, None, "API key for the Qdrant server")
COLLECTION = declare("RAGFLEET_RETRIEVAL_COLLECTION", str, "ragfleet_chunks", "collection name on the Qdrant server")
DIMENSION = declare("RAGFLEET_RETRIEVAL_DIMENSION", int, 384,
                    "dense vector size; must match the embedding model (all-MiniLM-L6-v2 = 384)", minimum=1)
MAX_TOP_K = declare("RAGFLEET_RETRIEVAL_MAX_TOP_K", int, 100, "largest accepted `top_k`", minimum=1)
MAX_CHUNKS_PER_UPSERT = declare("RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT", int, 2048, "largest accepted Upsert batch",
                                minimum=1)
MAX_QUERY_CHARS = declare("RAGFLEET_RETRIEVAL_MAX_QUERY_CHARS", int, 4096, "longest accepted query text", minimum=1)
DEFAULT_MODE = declare("RAGFLEET_RETRIEVAL_DEFAULT_MODE", str, "hybrid",
                       "mode used when a request leaves it unspecified (dense, sparse, hybrid)", choices=MODES)
CANDIDATES = declare("RAGFLEET_RETRIEVAL_CANDIDATES", int, 100,
                     "candidates fetched per leg before fusion, rerank and MMR", minimum=1)
RRF_K = declare("RAGFLEET_RETRIEVAL_RRF_K", int, 60, "reciprocal rank fusion constant k", minimum=1)
RERANK = declare("RAGFLEET_RETRIEVAL_RERANK", str, "fusion",
                 "reranker: `none`, `fusion` (dense cosine + BM25 rescoring), `tei` (HTTP /rerank), `onnx` (local "
                 "cross-encoder)", choices=RERANKERS)
RERANK_DEFAULT = declare("RAGFLEET_RETRIEVAL_RERANK_DEFAULT", bool, True, "rerank when the request leaves `rerank` unset")
RERANK_CANDIDATES = declare("RAGFLEET_RETRIEVAL_RERANK_CANDIDATES", int, 30,
                            "rerank depth: the top fused candidates the reranker reorders (the rest follow in fused "
                            "order)", minimum=1)
RERANK_ALPHA = declare("RAGFLEET_RETRIEVAL_RERANK_ALPHA", float, 0.5,
                       "weight of dense cosine vs normalised BM25 in the fusion rescorer (0.5 and depth 30 were best "
                       "on SciFact train)", minimum=0, maximum=1)
RERANK_URL = declare("RAGFLEET_RETRIEVAL_RERANK_URL", str, None,
                     "base URL of a text-embeddings-inference compatible reranker (`tei`)")
RERANK_MODEL_DIR = declare("RAGFLEET_RETRIEVAL_RERANK_MODEL_DIR", str, None,
                           "directory with `model.onnx` + `tokenizer.json` of a cross-encoder (`onnx`)")
RERANK_TIMEOUT_SECONDS = declare("RAGFLEET_RETRIEVAL_RERANK_TIMEOUT_SECONDS", float, 2.0, "deadline of one rerank call",
                                 minimum=0.01)
MMR_CANDIDATES = declare("RAGFLEET_RETRIEVAL_MMR_CANDIDATES", int, 50, "candidates MMR chooses from", minimum=1)
BM25_AVG_LEN = declare("RAGFLEET_RETRIEVAL_BM25_AVG_LEN", float, 200.0,
                       "expected document length (tokens) for BM25 length normalisation", minimum=1)
BM25_K1 = declare("RAGFLEET_RETRIEVAL_BM25_K1", float, 1.2, "BM25 term-frequency saturation", minimum=0)
BM25_B = declare("RAGFLEET_RETRIEVAL_BM25_B", float, 0.75, "BM25 length normalisation", minimum=0)
HNSW_M = declare("RAGFLEET_RETRIEVAL_HNSW_M", int, 16, "HNSW graph degree", minimum=4)
HNSW_EF_CONSTRUCT = declare("RAGFLEET_RETRIEVAL_HNSW_EF_CONSTRUCT", int, 128, "HNSW build breadth", minimum=4)
HNSW_EF = declare("RAGFLEET_RETRIEVAL_HNSW_EF", int, 128, "HNSW default search breadth", minimum=1)
INDEXING_THRESHOLD_KB = declare("RAGFLEET_RETRIEVAL_INDEXING_THRESHOLD_KB", int, 2000,
                                "segments larger than this get an HNSW index (smaller ones are searched exactly)",
                                minimum=1)
# Qdrant adds per-value links only for values under ~1/6 of a segment, so without ACORN a 30 % tenant's recall@10
# fell to 0.52-0.88 at ef 64 (bench/retrieval_speed.py).
ACORN_MAX_SELECTIVITY = declare("RAGFLEET_RETRIEVAL_ACORN_MAX_SELECTIVITY", float, 0.4,
                                "filters keeping at most this share of points (a big tenant) search with ACORN "
                                "(neighbours of neighbours) to keep recall; 0 = never", minimum=0, maximum=1)
QUANTIZATION = declare("RAGFLEET_RETRIEVAL_QUANTIZATION", str, "none",
                       "`int8` enables scalar quantization (searched with rescoring on the original vectors)",
                       choices=QUANTIZATIONS)
OPTIMIZE_IDLE_SECONDS = declare("RAGFLEET_RETRIEVAL_OPTIMIZE_IDLE_SECONDS", float, 2.0,
                                "build HNSW once no write arrived for this long (0 disables background optimize)",
                                minimum=0)
# Measured on 2 cores: a dense + sparse + fetch trio (300-5000 points, one segment) cost 10-30 % more CPU on the
# engine's CPU-derived pool (5 threads) than on one, in no less wall time; in the mesh, retrieval's CPU per
# uncached Ask fell from 2.00 to 1.31 ms with one thread. Concurrent searches use the cores anyway.
SEARCH_THREADS = declare("RAGFLEET_RETRIEVAL_SEARCH_THREADS", int, 1,
                         "threads of the embedded engine's search pool, which reads a shard's segments in parallel; "
                         "0 = the engine's default (derived from the CPU count). More only pays for big "
                         "multi-segment shards on idle cores", minimum=0)
EMBEDDING_ADDRESS = declare("RAGFLEET_RETRIEVAL_EMBEDDING_ADDRESS", str, None,
                            "embedding service for queries that carry text but no vector; unset = sparse-only for "
                            "those")
EMBEDDING_TIMEOUT_SECONDS = declare("RAGFLEET_RETRIEVAL_EMBEDDING_TIMEOUT_SECONDS", float, 5.0,
                                    "deadline of one Embed call", minimum=0.01)
FILTER_FIELDS = declare("RAGFLEET_RETRIEVAL_FILTER_FIELDS", tuple, ("*",),
                        "metadata keys a filter may name besides doc_id/title/chunk_index; `*` = any key")
CACHE_SIZE = declare("RAGFLEET_RETRIEVAL_CACHE_SIZE", int, 2048,
                     "L1 (in-process) result cache entries; 0 disables the cache", minimum=0)
CACHE_TTL_SECONDS = declare("RAGFLEET_RETRIEVAL_CACHE_TTL_SECONDS", float, 600.0,
                            "lifetime of cached results (L1 and Redis L2)", minimum=1)


def check_qdrant_url(url: str) -> str:
    """Refuse anything but an http(s) URL or ":memory:": qdrant-client reads any other string as a local directory,
    so "qdrant:6333" would silently give every replica a private, empty on-disk database."""
    if url != LOCAL_QDRANT_URL and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{QDRANT_URL.name}={url!r} must start with http:// or https:// (e.g. "
                          f"http://qdrant:6333), or be {LOCAL_QDRANT_URL} for qdrant-client's in-process mode")
    return url


@dataclass(frozen=True)
class IndexConfig:
    """How the dense index is built and searched (both stores)."""

    dimension: int = DIMENSION.default
    hnsw_m: int = HNSW_M.default
    hnsw_ef_construct: int = HNSW_EF_CONSTRUCT.default
    hnsw_ef: int = HNSW_EF.default
    indexing_threshold_kb: int = INDEXING_THRESHOLD_KB.default
    quantization: str = QUANTIZATION.default
    optimize_idle_seconds: float = OPTIMIZE_IDLE_SECONDS.default
    # Filters keeping at most this share of the points (a big tenant) search with ACORN: a filtered HNSW walk also
    # steps through neighbours of neighbours. 0 = never.
    acorn_max_selectivity: float = ACORN_MAX_SELECTIVITY.default
    search_threads: int = SEARCH_THREADS.default  # the embedded engine's search pool (0 = its CPU-derived default)


@dataclass(frozen=True)
class Bm25Config:
    k1: float = BM25_K1.default
    b: float = BM25_B.default
    avg_len: float = BM25_AVG_LEN.default


@dataclass(frozen=True)
class SearchConfig:
    """Limits and defaults of the search pipeline."""

    max_top_k: int = MAX_TOP_K.default
    max_chunks_per_upsert: int = MAX_CHUNKS_PER_UPSERT.default
    max_query_chars: int = MAX_QUERY_CHARS.default
    default_mode: str = DEFAULT_MODE.default
    candidates: int = CANDIDATES.default
    rrf_k: int = RRF_K.default
    rerank_default: bool = RERANK_DEFAULT.default
    rerank_candidates: int = RERANK_CANDIDATES.default
    mmr_candidates: int = MMR_CANDIDATES.default
    filter_fields: tuple[str, ...] = FILTER_FIELDS.default


@dataclass(frozen=True)
class RerankConfig:
    kind: str = RERANK.default
    alpha: float = RERANK_ALPHA.default
    url: str | None = None
    model_dir: str | None = None
    timeout_seconds: float = RERANK_TIMEOUT_SECONDS.default


@dataclass(frozen=True)
class CacheConfig:
    size: int = CACHE_SIZE.default
    ttl_seconds: float = CACHE_TTL_SECONDS.default
    redis_url: str | None = None


@dataclass(frozen=True)
class RetrievalConfig:
    server: ServerConfig
    store: str = STORE.default
    data_dir: str = os.path.join(DATA_DIR.default, "retrieval")
    qdrant_url: str = QDRANT_URL.default
    qdrant_grpc_port: int = QDRANT_GRPC_PORT.default
    qdrant_api_key: str | None = None
    collection: str = COLLECTION.default
    embedding_address: str | None = None
    embedding_timeout_seconds: float = EMBEDDING_TIMEOUT_SECONDS.default
    index: IndexConfig = field(default_factory=IndexConfig)
    bm25: Bm25Config = field(default_factory=Bm25Config)
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RetrievalConfig":
        env = Env(environ=environ)
        store, rerank = env.read(STORE), env.read(RERANK)
        rerank_url, model_dir = env.read(RERANK_URL), env.read(RERANK_MODEL_DIR)
        if rerank == "tei" and not rerank_url:
            raise ConfigError(f"{RERANK.name}=tei needs {RERANK_URL.name}")
        if rerank == "onnx" and not model_dir:
            raise ConfigError(f"{RERANK.name}=onnx needs {RERANK_MODEL_DIR.name}")
        qdrant_url = env.read(QDRANT_URL)
        if store == "remote":
            check_qdrant_url(qdrant_url)
        return cls(
            server=ServerConfig.from_env("retrieval", environ),
            store=store,
            data_dir=os.path.join(env.read(DATA_DIR), "retrieval"),
            qdrant_url=qdrant_url,
            qdrant_grpc_port=env.read(QDRANT_GRPC_PORT),
            qdrant_api_key=env.read(QDRANT_API_KEY),
            collection=env.read(COLLECTION),
            embedding_address=env.read(EMBEDDING_ADDRESS),
            embedding_timeout_seconds=env.read(EMBEDDING_TIMEOUT_SECONDS),
            index=IndexConfig(
                dimension=env.read(DIMENSION),
                hnsw_m=env.read(HNSW_M),
                hnsw_ef_construct=env.read(HNSW_EF_CONSTRUCT),
                hnsw_ef=env.read(HNSW_EF),
                indexing_threshold_kb=env.read(INDEXING_THRESHOLD_KB),
                quantization=env.read(QUANTIZATION),
                optimize_idle_seconds=env.read(OPTIMIZE_IDLE_SECONDS),
                acorn_max_selectivity=env.read(ACORN_MAX_SELECTIVITY),
                search_threads=env.read(SEARCH_THREADS),
            ),
            bm25=Bm25Config(k1=env.read(BM25_K1), b=env.read(BM25_B), avg_len=env.read(BM25_AVG_LEN)),
            search=SearchConfig(
                max_top_k=env.read(MAX_TOP_K),
                max_chunks_per_upsert=env.read(MAX_CHUNKS_PER_UPSERT),
                max_query_chars=env.read(MAX_QUERY_CHARS),
                default_mode=env.read(DEFAULT_MODE),
                candidates=env.read(CANDIDATES),
                rrf_k=env.read(RRF_K),
                rerank_default=env.read(RERANK_DEFAULT),
                rerank_candidates=env.read(RERANK_CANDIDATES),
                mmr_candidates=env.read(MMR_CANDIDATES),
                filter_fields=env.read(FILTER_FIELDS),
            ),
            rerank=RerankConfig(kind=rerank, alpha=env.read(RERANK_ALPHA), url=rerank_url, model_dir=model_dir,
                                timeout_seconds=env.read(RERANK_TIMEOUT_SECONDS)),
            cache=CacheConfig(size=env.read(CACHE_SIZE), ttl_seconds=env.read(CACHE_TTL_SECONDS),
                              redis_url=env.read(REDIS_URL)),
        )
