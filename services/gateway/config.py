"""Gateway configuration: its RAGFLEET_GATEWAY_* variables, each declared once below, plus the shared RAGFLEET_* ones
(the README's gateway table is generated from them by scripts/gen_config_docs.py).

Durations are named *_SECONDS like every other service's; the older *_S names still work, as deprecated aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from services.runtime import corpus_version
from services.runtime.config import MAX_TOKENS_LIMIT, REDIS_URL, Env, ServerConfig, declare
from services.runtime.errors import ConfigError
from services.runtime.limits import MAX_DOC_IDS_PER_DELETE

# The key retrieval advances on every write (runtime/corpus_version.py); not configurable, so the two cannot differ.
DEFAULT_CORPUS_VERSION_KEY = corpus_version.KEY_FORMAT


EMBEDDING_ADDRESS = declare("RAGFLEET_GATEWAY_EMBEDDING_ADDRESS", str, "127.0.0.1:50051", "embedding service host:port")
RETRIEVAL_ADDRESS = declare("RAGFLEET_GATEWAY_RETRIEVAL_ADDRESS", str, "127.0.0.1:50052", "retrieval service host:port")
GENERATION_ADDRESS = declare("RAGFLEET_GATEWAY_GENERATION_ADDRESS", str, "127.0.0.1:50053",
                             "generation service host:port")
API_KEYS = declare("RAGFLEET_GATEWAY_API_KEYS", str, None,
                   "`key1=tenantA,key2=tenantB`; with neither this nor the file set, auth is off (local development; "
                   "a warning is logged)")
API_KEYS_FILE = declare("RAGFLEET_GATEWAY_API_KEYS_FILE", str, None,
                        "mounted secrets file, one `key=tenant` per line (`#` comments); set but holding no keys fails "
                        "start-up")
MAX_IN_FLIGHT = declare("RAGFLEET_GATEWAY_MAX_IN_FLIGHT", int, 512,
                        "Asks in progress per replica; beyond it RESOURCE_EXHAUSTED at once", minimum=1)
DEFAULT_TOP_K = declare("RAGFLEET_GATEWAY_DEFAULT_TOP_K", int, 5,
                        "passages when AskRequest.top_k is 0 (at most MAX_TOP_K, else start-up fails)", minimum=1)
MAX_TOP_K = declare("RAGFLEET_GATEWAY_MAX_TOP_K", int, 50, "largest accepted top_k", minimum=1)
MAX_QUESTION_CHARS = declare("RAGFLEET_GATEWAY_MAX_QUESTION_CHARS", int, 4000, "longest accepted question", minimum=1)
QUERY_VARIANTS = declare("RAGFLEET_GATEWAY_QUERY_VARIANTS", int, 1,
                         "query variants searched in parallel and merged by RRF (1 = the question only)", minimum=1)
MAX_CONTEXT_TOKENS = declare("RAGFLEET_GATEWAY_MAX_CONTEXT_TOKENS", int, 0,
                             "passed to retrieval as max_context_tokens (0 = no cut)", minimum=0)
COALESCE_WINDOW_MS = declare("RAGFLEET_GATEWAY_COALESCE_WINDOW_MS", float, 20.0,
                             "about one delta message per window to the client: deltas generation sends back to back "
                             "leave merged, none held longer than this counting the event loop's own lateness (the "
                             "first never, nor deltas coming less than two a window); 0 = forwarded one for one",
                             minimum=0)
EMBED_TIMEOUT = declare("RAGFLEET_GATEWAY_EMBED_TIMEOUT_SECONDS", float, 2.0,
                        "per-call budget for Embed on the Ask path", minimum=0.001,
                        aliases=("RAGFLEET_GATEWAY_EMBED_TIMEOUT_S",))
RETRIEVE_TIMEOUT = declare("RAGFLEET_GATEWAY_RETRIEVE_TIMEOUT_SECONDS", float, 3.0, "per-call budget for Search",
                           minimum=0.001, aliases=("RAGFLEET_GATEWAY_RETRIEVE_TIMEOUT_S",))
HISTORY_TIMEOUT = declare("RAGFLEET_GATEWAY_HISTORY_TIMEOUT_SECONDS", float, 0.5,
                          "budget for loading conversation history, and for storing the new turn after the answer",
                          minimum=0.001, aliases=("RAGFLEET_GATEWAY_HISTORY_TIMEOUT_S",))
CACHE_TIMEOUT = declare("RAGFLEET_GATEWAY_CACHE_TIMEOUT_SECONDS", float, 0.25,
                        "budget for the response-cache lookup, and for storing the answer after it", minimum=0.001,
                        aliases=("RAGFLEET_GATEWAY_CACHE_TIMEOUT_S",))
GENERATE_TIMEOUT = declare("RAGFLEET_GATEWAY_GENERATE_TIMEOUT_SECONDS", float, 120.0,
                           "budget for the whole generation stream when the client sets no deadline", minimum=0.001,
                           aliases=("RAGFLEET_GATEWAY_GENERATE_TIMEOUT_S",))
INGEST_TIMEOUT = declare("RAGFLEET_GATEWAY_INGEST_TIMEOUT_SECONDS", float, 60.0,
                         "per-call budget for Embed/Upsert/Delete on the ingest path", minimum=0.001,
                         aliases=("RAGFLEET_GATEWAY_INGEST_TIMEOUT_S",))
CACHE_ENABLED = declare("RAGFLEET_GATEWAY_CACHE_ENABLED", bool, True, "response cache on/off")
CACHE_TTL = declare("RAGFLEET_GATEWAY_CACHE_TTL_SECONDS", int, 3600,
                    "response-cache entry lifetime, in Redis and in each replica's L1 and semantic index alike",
                    minimum=1, aliases=("RAGFLEET_GATEWAY_CACHE_TTL_S",))
CACHE_L1_ENTRIES = declare("RAGFLEET_GATEWAY_CACHE_L1_ENTRIES", int, 4096, "in-process LRU size", minimum=0)
SEMANTIC_CACHE = declare("RAGFLEET_GATEWAY_SEMANTIC_CACHE", bool, False,
                         "also serve answers to questions whose embedding is close enough (same tenant, corpus "
                         "version, filters, top_k, mode and generation params)")
SEMANTIC_THRESHOLD = declare("RAGFLEET_GATEWAY_SEMANTIC_THRESHOLD", float, 0.95,
                             "cosine similarity needed for a semantic hit", minimum=0)
REDIS_PREFIX = declare("RAGFLEET_GATEWAY_REDIS_PREFIX", str, "ragfleet:gw:",
                       "prefix of every gateway Redis key (cache entries, conversations)")
CONVERSATION_TTL = declare("RAGFLEET_GATEWAY_CONVERSATION_TTL_SECONDS", int, 86400,
                           "conversation lifetime after its last turn", minimum=1,
                           aliases=("RAGFLEET_GATEWAY_CONVERSATION_TTL_S",))
CONVERSATION_MAX_TURNS = declare("RAGFLEET_GATEWAY_CONVERSATION_MAX_TURNS", int, 20,
                                 "turns kept per conversation (oldest dropped)", minimum=2)
CHUNK_TOKENS = declare("RAGFLEET_GATEWAY_CHUNK_TOKENS", int, 200,
                       "default chunk size in tokens (at most MAX_CHUNK_TOKENS, else start-up fails)", minimum=16)
CHUNK_OVERLAP = declare("RAGFLEET_GATEWAY_CHUNK_OVERLAP", int, 40,
                        "default chunk overlap in tokens; at most CHUNK_TOKENS/4 (else start-up fails); a request with "
                        "its own chunk_tokens gets at most a quarter of those", minimum=0)
MAX_CHUNK_TOKENS = declare("RAGFLEET_GATEWAY_MAX_CHUNK_TOKENS", int, 512,
                           "largest accepted IngestRequest.chunk_tokens", minimum=16)
TOKENIZER_PATH = declare("RAGFLEET_GATEWAY_TOKENIZER_PATH", str, None,
                         "tokenizer.json for chunking (start-up fails if a set path cannot be loaded); unset: the one "
                         "vendored under services/embedding, else a word estimate", shown_default="(auto)")
EMBED_BATCH = declare("RAGFLEET_GATEWAY_EMBED_BATCH", int, 64, "texts per Embed call while ingesting", minimum=1)
UPSERT_BATCH = declare("RAGFLEET_GATEWAY_UPSERT_BATCH", int, 256, "chunks per Upsert call (whole documents only)",
                       minimum=1)
INGEST_CONCURRENCY = declare("RAGFLEET_GATEWAY_INGEST_CONCURRENCY", int, 4, "Embed/Upsert calls in flight per Ingest",
                             minimum=1)
MAX_DOCUMENTS = declare("RAGFLEET_GATEWAY_MAX_DOCUMENTS", int, 1000,
                        f"documents per IngestRequest and doc_ids per DeleteDocuments (at most "
                        f"{MAX_DOC_IDS_PER_DELETE})", minimum=1, maximum=MAX_DOC_IDS_PER_DELETE)
MAX_DOCUMENT_CHARS = declare("RAGFLEET_GATEWAY_MAX_DOCUMENT_CHARS", int, 4_000_000,
                             "longest document text in characters (refused before chunking)", minimum=1)
# A document is upserted whole, so it must fit one Upsert (RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT, 2048).
MAX_CHUNKS_PER_DOCUMENT = declare("RAGFLEET_GATEWAY_MAX_CHUNKS_PER_DOCUMENT", int, 2048,
                                  "most chunks one document may make, checked before embedding; keep it at most "
                                  "`RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT` (a document is upserted whole)",
                                  minimum=1)


@dataclass(frozen=True)
class StageBudgets:
    """Per-stage time budgets in seconds; each call also gets no more than the client's remaining deadline.

        Deadline(remaining=0.4).budget(StageBudgets(embed=2.0).embed, "embed")   # -> 0.4 (gateway/deadlines.py)
    """

    cache: float = CACHE_TIMEOUT.default
    history: float = HISTORY_TIMEOUT.default
    embed: float = EMBED_TIMEOUT.default
    retrieve: float = RETRIEVE_TIMEOUT.default
    generate: float = GENERATE_TIMEOUT.default
    ingest: float = INGEST_TIMEOUT.default


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = CACHE_ENABLED.default
    ttl_seconds: int = CACHE_TTL.default
    l1_entries: int = CACHE_L1_ENTRIES.default
    semantic: bool = SEMANTIC_CACHE.default
    semantic_threshold: float = SEMANTIC_THRESHOLD.default
    redis_prefix: str = REDIS_PREFIX.default
    corpus_version_key: str = DEFAULT_CORPUS_VERSION_KEY  # tests isolate theirs; services keep the default


@dataclass(frozen=True)
class ConversationConfig:
    ttl_seconds: int = CONVERSATION_TTL.default
    max_turns: int = CONVERSATION_MAX_TURNS.default


@dataclass(frozen=True)
class IngestConfig:
    chunk_tokens: int = CHUNK_TOKENS.default
    chunk_overlap: int = CHUNK_OVERLAP.default
    max_chunk_tokens: int = MAX_CHUNK_TOKENS.default
    tokenizer_path: str | None = None
    embed_batch: int = EMBED_BATCH.default
    upsert_batch: int = UPSERT_BATCH.default
    concurrency: int = INGEST_CONCURRENCY.default
    max_documents: int = MAX_DOCUMENTS.default
    max_document_chars: int = MAX_DOCUMENT_CHARS.default
    max_chunks_per_document: int = MAX_CHUNKS_PER_DOCUMENT.default


@dataclass(frozen=True)
class AskLimits:
    max_in_flight: int = MAX_IN_FLIGHT.default
    default_top_k: int = DEFAULT_TOP_K.default
    max_top_k: int = MAX_TOP_K.default
    max_question_chars: int = MAX_QUESTION_CHARS.default
    query_variants: int = QUERY_VARIANTS.default
    # False runs the Ask's branches one after another: the baseline bench/gateway_bench.py measures the fan-out
    # against. Not an environment variable: no deployment is better off sequential.
    parallel_fanout: bool = True
    max_context_tokens: int = MAX_CONTEXT_TOKENS.default
    # Seconds; 0 relays deltas one for one, as a pipeline built in-process (tests) does. The service reads
    # RAGFLEET_GATEWAY_COALESCE_WINDOW_MS.
    coalesce_window: float = 0.0
    # Generation's RAGFLEET_GENERATION_MAX_TOKENS_LIMIT: one setting, so both refuse the same requests.
    max_tokens: int = MAX_TOKENS_LIMIT.default


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    embedding_address: str = EMBEDDING_ADDRESS.default
    retrieval_address: str = RETRIEVAL_ADDRESS.default
    generation_address: str = GENERATION_ADDRESS.default
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> tenant
    redis_url: str | None = None
    ask: AskLimits = AskLimits()
    budgets: StageBudgets = StageBudgets()
    cache: CacheConfig = CacheConfig()
    conversations: ConversationConfig = ConversationConfig()
    ingest: IngestConfig = IngestConfig()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GatewayConfig":
        env = Env(environ=environ)
        keys = parse_api_keys(env.read(API_KEYS) or "", source=API_KEYS.name)
        keys_file = env.read(API_KEYS_FILE)
        if keys_file:
            try:
                text = Path(keys_file).read_text()
            except OSError as exc:
                raise ConfigError(f"{API_KEYS_FILE.name}={keys_file!r} cannot be read: {exc}") from None
            file_keys = parse_api_keys(text, source=keys_file)
            if not file_keys:
                # An empty mounted secret must not silently turn authentication off (fail closed).
                raise ConfigError(f"{API_KEYS_FILE.name}={keys_file!r} holds no keys; add 'key=tenant' lines, or "
                                  f"unset the variable to run without authentication")
            keys = {**keys, **file_keys}
        ingest = IngestConfig(
            chunk_tokens=env.read(CHUNK_TOKENS),
            chunk_overlap=env.read(CHUNK_OVERLAP),
            max_chunk_tokens=env.read(MAX_CHUNK_TOKENS),
            tokenizer_path=env.read(TOKENIZER_PATH),
            embed_batch=env.read(EMBED_BATCH),
            upsert_batch=env.read(UPSERT_BATCH),
            concurrency=env.read(INGEST_CONCURRENCY),
            max_documents=env.read(MAX_DOCUMENTS),
            max_document_chars=env.read(MAX_DOCUMENT_CHARS),
            max_chunks_per_document=env.read(MAX_CHUNKS_PER_DOCUMENT),
        )
        _check_ingest(ingest)
        ask = AskLimits(
            max_in_flight=env.read(MAX_IN_FLIGHT),
            default_top_k=env.read(DEFAULT_TOP_K),
            max_top_k=env.read(MAX_TOP_K),
            max_question_chars=env.read(MAX_QUESTION_CHARS),
            query_variants=env.read(QUERY_VARIANTS),
            max_context_tokens=env.read(MAX_CONTEXT_TOKENS),
            coalesce_window=env.read(COALESCE_WINDOW_MS) / 1000,
            max_tokens=env.read(MAX_TOKENS_LIMIT),
        )
        _check_ask(ask)
        return cls(
            server=ServerConfig.from_env("gateway", environ),
            embedding_address=env.read(EMBEDDING_ADDRESS),
            retrieval_address=env.read(RETRIEVAL_ADDRESS),
            generation_address=env.read(GENERATION_ADDRESS),
            api_keys=keys,
            redis_url=env.read(REDIS_URL),
            ask=ask,
            budgets=StageBudgets(cache=env.read(CACHE_TIMEOUT), history=env.read(HISTORY_TIMEOUT),
                                 embed=env.read(EMBED_TIMEOUT), retrieve=env.read(RETRIEVE_TIMEOUT),
                                 generate=env.read(GENERATE_TIMEOUT), ingest=env.read(INGEST_TIMEOUT)),
            cache=CacheConfig(
                enabled=env.read(CACHE_ENABLED),
                ttl_seconds=env.read(CACHE_TTL),
                l1_entries=env.read(CACHE_L1_ENTRIES),
                semantic=env.read(SEMANTIC_CACHE),
                semantic_threshold=env.read(SEMANTIC_THRESHOLD),
                redis_prefix=env.read(REDIS_PREFIX),
            ),
            conversations=ConversationConfig(ttl_seconds=env.read(CONVERSATION_TTL),
                                             max_turns=env.read(CONVERSATION_MAX_TURNS)),
            ingest=ingest,
        )


def default_overlap_cap(chunk_tokens: int) -> int:
    """Largest default overlap for a chunk size: a quarter of it (more re-embeds the same text for little recall)."""
    return chunk_tokens // 4


def _check_ingest(ingest: IngestConfig) -> None:
    """Refuse chunking settings the ingest path would otherwise reject or silently change."""
    if ingest.chunk_tokens > ingest.max_chunk_tokens:
        raise ConfigError(f"RAGFLEET_GATEWAY_CHUNK_TOKENS={ingest.chunk_tokens} is larger than "
                          f"RAGFLEET_GATEWAY_MAX_CHUNK_TOKENS={ingest.max_chunk_tokens}: every Ingest without its own "
                          f"chunk_tokens would be refused; lower the first or raise the second")
    cap = default_overlap_cap(ingest.chunk_tokens)
    if ingest.chunk_overlap > cap:
        raise ConfigError(f"RAGFLEET_GATEWAY_CHUNK_OVERLAP={ingest.chunk_overlap} is more than a quarter of "
                          f"RAGFLEET_GATEWAY_CHUNK_TOKENS={ingest.chunk_tokens}: set it to at most {cap}")


def _check_ask(ask: AskLimits) -> None:
    if ask.default_top_k > ask.max_top_k:
        raise ConfigError(f"RAGFLEET_GATEWAY_DEFAULT_TOP_K={ask.default_top_k} is larger than "
                          f"RAGFLEET_GATEWAY_MAX_TOP_K={ask.max_top_k}: lower the first or raise the second")


def parse_api_keys(text: str, *, source: str) -> dict[str, str]:
    """Parse `key=tenant` pairs separated by commas or newlines; `#` starts a comment line (commas and all).

        parse_api_keys("k1=acme, k2=globex", source="env")  # -> {"k1": "acme", "k2": "globex"}
    """
    keys: dict[str, str] = {}
    entries = (entry.strip() for line in text.splitlines() if not line.strip().startswith("#")
               for entry in line.split(","))
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        key, sep, tenant = entry.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise ConfigError(f"{source}: entry {entry.split('=')[0][:4]}... must look like key=tenant")
        keys[key] = tenant
    return keys
