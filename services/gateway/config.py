"""Gateway configuration, read once from RAGFLEET_GATEWAY_* (and shared RAGFLEET_*) environment variables.

| variable | default | meaning |
|---|---|---|
| RAGFLEET_GATEWAY_PORT | 50050 | gRPC port (plus the shared server variables of ServerConfig) |
| RAGFLEET_GATEWAY_EMBEDDING_ADDRESS | 127.0.0.1:50051 | embedding service host:port |
| RAGFLEET_GATEWAY_RETRIEVAL_ADDRESS | 127.0.0.1:50052 | retrieval service host:port |
| RAGFLEET_GATEWAY_GENERATION_ADDRESS | 127.0.0.1:50053 | generation service host:port |
| RAGFLEET_GATEWAY_API_KEYS | (none) | `key1=tenantA,key2=tenantB`; with neither this nor the file set, auth is off (local development; a warning is logged) |
| RAGFLEET_GATEWAY_API_KEYS_FILE | (none) | mounted secrets file, one `key=tenant` per line (`#` comments); set but holding no keys fails start-up |
| RAGFLEET_GATEWAY_MAX_IN_FLIGHT | 512 | Asks in progress per replica; beyond it RESOURCE_EXHAUSTED at once |
| RAGFLEET_GATEWAY_DEFAULT_TOP_K | 5 | passages when AskRequest.top_k is 0 (at most MAX_TOP_K) |
| RAGFLEET_GATEWAY_MAX_TOP_K | 50 | largest accepted top_k |
| RAGFLEET_GATEWAY_MAX_QUESTION_CHARS | 4000 | longest accepted question |
| RAGFLEET_GATEWAY_QUERY_VARIANTS | 1 | query variants searched in parallel and merged by RRF (1 = the question only) |
| RAGFLEET_GATEWAY_PARALLEL_FANOUT | true | run cache ∥ embed ∥ history concurrently (false = one after another; for benchmarks) |
| RAGFLEET_GATEWAY_MAX_CONTEXT_TOKENS | 0 | passed to retrieval as max_context_tokens (0 = no cut) |
| RAGFLEET_GATEWAY_COALESCE_WINDOW_MS | 20 | at most one delta message per window to the client: deltas generation sends back to back leave merged, none held longer than this (the first never); 0 = forwarded one for one |
| RAGFLEET_GATEWAY_EMBED_TIMEOUT_S | 2.0 | per-call budget for Embed on the Ask path |
| RAGFLEET_GATEWAY_RETRIEVE_TIMEOUT_S | 3.0 | per-call budget for Search |
| RAGFLEET_GATEWAY_HISTORY_TIMEOUT_S | 0.5 | budget for loading conversation history |
| RAGFLEET_GATEWAY_CACHE_TIMEOUT_S | 0.25 | budget for the response-cache lookup |
| RAGFLEET_GATEWAY_GENERATE_TIMEOUT_S | 120.0 | budget for the whole generation stream when the client sets no deadline |
| RAGFLEET_GATEWAY_INGEST_TIMEOUT_S | 60.0 | per-call budget for Embed/Upsert/Delete on the ingest path |
| RAGFLEET_GATEWAY_CACHE_ENABLED | true | response cache on/off |
| RAGFLEET_GATEWAY_CACHE_TTL_S | 3600 | response-cache entry lifetime |
| RAGFLEET_GATEWAY_CACHE_L1_ENTRIES | 4096 | in-process LRU size |
| RAGFLEET_GATEWAY_SEMANTIC_CACHE | false | also serve answers to questions whose embedding is close enough |
| RAGFLEET_GATEWAY_SEMANTIC_THRESHOLD | 0.95 | cosine similarity needed for a semantic hit |
| RAGFLEET_GATEWAY_REDIS_PREFIX | ragfleet:gw: | prefix of every gateway Redis key (cache entries, conversations) |
| RAGFLEET_GATEWAY_CONVERSATION_TTL_S | 86400 | conversation lifetime after its last turn |
| RAGFLEET_GATEWAY_CONVERSATION_MAX_TURNS | 20 | turns kept per conversation (oldest dropped) |
| RAGFLEET_GATEWAY_CHUNK_TOKENS | 200 | default chunk size in tokens (at most MAX_CHUNK_TOKENS) |
| RAGFLEET_GATEWAY_CHUNK_OVERLAP | 40 | default chunk overlap in tokens; at most CHUNK_TOKENS/4 (else start-up fails); a request with its own chunk_tokens gets at most a quarter of those |
| RAGFLEET_GATEWAY_MAX_CHUNK_TOKENS | 512 | largest accepted IngestRequest.chunk_tokens |
| RAGFLEET_GATEWAY_TOKENIZER_PATH | (auto) | tokenizer.json for chunking (start-up fails if it cannot be loaded); unset: the one vendored under services/embedding, else a word estimate |
| RAGFLEET_GATEWAY_EMBED_BATCH | 64 | texts per Embed call while ingesting |
| RAGFLEET_GATEWAY_UPSERT_BATCH | 256 | chunks per Upsert call (whole documents only) |
| RAGFLEET_GATEWAY_INGEST_CONCURRENCY | 4 | Embed/Upsert calls in flight per Ingest |
| RAGFLEET_GATEWAY_MAX_DOCUMENTS | 1000 | documents per IngestRequest and doc_ids per DeleteDocuments (at most 10000) |
| RAGFLEET_GATEWAY_MAX_DOCUMENT_CHARS | 4000000 | longest document text in characters (refused before chunking) |
| RAGFLEET_GATEWAY_MAX_CHUNKS_PER_DOCUMENT | 2048 | most chunks one document may make, checked before embedding; keep it at most RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT (a document is upserted whole) |
| RAGFLEET_GENERATION_MAX_TOKENS_LIMIT | 4096 | read here too: an Ask asking for more max_tokens than generation allows is refused before its first event |
| RAGFLEET_REDIS_URL | (none) | shared Redis; unset = in-process cache and conversations only |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from services.runtime import corpus_version
from services.runtime.config import Env, ServerConfig, redis_url
from services.runtime.errors import ConfigError
from services.runtime.limits import DEFAULT_MAX_TOKENS_LIMIT, MAX_DOC_IDS_PER_DELETE

DEFAULT_EMBEDDING_ADDRESS = "127.0.0.1:50051"
DEFAULT_RETRIEVAL_ADDRESS = "127.0.0.1:50052"
DEFAULT_GENERATION_ADDRESS = "127.0.0.1:50053"
# The key retrieval advances on every write (runtime/corpus_version.py); not configurable, so the two cannot differ.
DEFAULT_CORPUS_VERSION_KEY = corpus_version.KEY_FORMAT
DEFAULT_COALESCE_WINDOW_MS = 20.0  # deltas back to back leave as one message per window (issue 12)


@dataclass(frozen=True)
class StageBudgets:
    """Per-stage time budgets in seconds; each call also gets no more than the client's remaining deadline.

        Deadline(remaining=0.4).budget(StageBudgets(embed=2.0).embed, "embed")   # -> 0.4 (gateway/deadlines.py)
    """

    cache: float = 0.25
    history: float = 0.5
    embed: float = 2.0
    retrieve: float = 3.0
    generate: float = 120.0
    ingest: float = 60.0


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    ttl_seconds: int = 3600
    l1_entries: int = 4096
    semantic: bool = False
    semantic_threshold: float = 0.95
    redis_prefix: str = "ragfleet:gw:"
    corpus_version_key: str = DEFAULT_CORPUS_VERSION_KEY  # tests isolate theirs; services keep the default


@dataclass(frozen=True)
class ConversationConfig:
    ttl_seconds: int = 86400
    max_turns: int = 20


@dataclass(frozen=True)
class IngestConfig:
    chunk_tokens: int = 200
    chunk_overlap: int = 40
    max_chunk_tokens: int = 512
    tokenizer_path: str | None = None
    embed_batch: int = 64
    upsert_batch: int = 256
    concurrency: int = 4
    max_documents: int = 1000
    max_document_chars: int = 4_000_000
    # A document is upserted whole, so it must fit one Upsert (RAGFLEET_RETRIEVAL_MAX_CHUNKS_PER_UPSERT, 2048).
    max_chunks_per_document: int = 2048


@dataclass(frozen=True)
class AskLimits:
    max_in_flight: int = 512
    default_top_k: int = 5
    max_top_k: int = 50
    max_question_chars: int = 4000
    query_variants: int = 1
    parallel_fanout: bool = True
    max_context_tokens: int = 0
    # Seconds; 0 relays deltas one for one, as a pipeline built in-process (tests) does. The service reads
    # RAGFLEET_GATEWAY_COALESCE_WINDOW_MS, default DEFAULT_COALESCE_WINDOW_MS.
    coalesce_window: float = 0.0
    # Generation's RAGFLEET_GENERATION_MAX_TOKENS_LIMIT: one setting, so both refuse the same requests.
    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    embedding_address: str = DEFAULT_EMBEDDING_ADDRESS
    retrieval_address: str = DEFAULT_RETRIEVAL_ADDRESS
    generation_address: str = DEFAULT_GENERATION_ADDRESS
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> tenant
    redis_url: str | None = None
    ask: AskLimits = AskLimits()
    budgets: StageBudgets = StageBudgets()
    cache: CacheConfig = CacheConfig()
    conversations: ConversationConfig = ConversationConfig()
    ingest: IngestConfig = IngestConfig()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GatewayConfig":
        env = Env("RAGFLEET_GATEWAY_", environ)
        keys = parse_api_keys(env.str("API_KEYS", ""), source="RAGFLEET_GATEWAY_API_KEYS")
        keys_file = env.optional_str("API_KEYS_FILE")
        if keys_file:
            try:
                text = Path(keys_file).read_text()
            except OSError as exc:
                raise ConfigError(f"RAGFLEET_GATEWAY_API_KEYS_FILE={keys_file!r} cannot be read: {exc}") from None
            file_keys = parse_api_keys(text, source=keys_file)
            if not file_keys:
                # An empty mounted secret must not silently turn authentication off (fail closed).
                raise ConfigError(f"RAGFLEET_GATEWAY_API_KEYS_FILE={keys_file!r} holds no keys; add 'key=tenant' "
                                  f"lines, or unset the variable to run without authentication")
            keys = {**keys, **file_keys}
        ingest = IngestConfig(
            chunk_tokens=env.int("CHUNK_TOKENS", 200, minimum=16),
            chunk_overlap=env.int("CHUNK_OVERLAP", 40, minimum=0),
            max_chunk_tokens=env.int("MAX_CHUNK_TOKENS", 512, minimum=16),
            tokenizer_path=env.optional_str("TOKENIZER_PATH"),
            embed_batch=env.int("EMBED_BATCH", 64, minimum=1),
            upsert_batch=env.int("UPSERT_BATCH", 256, minimum=1),
            concurrency=env.int("INGEST_CONCURRENCY", 4, minimum=1),
            max_documents=env.int("MAX_DOCUMENTS", 1000, minimum=1),
            max_document_chars=env.int("MAX_DOCUMENT_CHARS", 4_000_000, minimum=1),
            max_chunks_per_document=env.int("MAX_CHUNKS_PER_DOCUMENT", 2048, minimum=1),
        )
        _check_ingest(ingest)
        ask = AskLimits(
            max_in_flight=env.int("MAX_IN_FLIGHT", 512, minimum=1),
            default_top_k=env.int("DEFAULT_TOP_K", 5, minimum=1),
            max_top_k=env.int("MAX_TOP_K", 50, minimum=1),
            max_question_chars=env.int("MAX_QUESTION_CHARS", 4000, minimum=1),
            query_variants=env.int("QUERY_VARIANTS", 1, minimum=1),
            parallel_fanout=env.bool("PARALLEL_FANOUT", True),
            max_context_tokens=env.int("MAX_CONTEXT_TOKENS", 0, minimum=0),
            coalesce_window=env.float("COALESCE_WINDOW_MS", DEFAULT_COALESCE_WINDOW_MS, minimum=0) / 1000,
            max_tokens=Env("RAGFLEET_GENERATION_", environ).int("MAX_TOKENS_LIMIT", DEFAULT_MAX_TOKENS_LIMIT,
                                                                minimum=1),
        )
        _check_ask(ask)
        return cls(
            server=ServerConfig.from_env("gateway", environ),
            embedding_address=env.str("EMBEDDING_ADDRESS", DEFAULT_EMBEDDING_ADDRESS),
            retrieval_address=env.str("RETRIEVAL_ADDRESS", DEFAULT_RETRIEVAL_ADDRESS),
            generation_address=env.str("GENERATION_ADDRESS", DEFAULT_GENERATION_ADDRESS),
            api_keys=keys,
            redis_url=redis_url(environ),
            ask=ask,
            budgets=StageBudgets(
                cache=env.float("CACHE_TIMEOUT_S", 0.25, minimum=0.001),
                history=env.float("HISTORY_TIMEOUT_S", 0.5, minimum=0.001),
                embed=env.float("EMBED_TIMEOUT_S", 2.0, minimum=0.001),
                retrieve=env.float("RETRIEVE_TIMEOUT_S", 3.0, minimum=0.001),
                generate=env.float("GENERATE_TIMEOUT_S", 120.0, minimum=0.001),
                ingest=env.float("INGEST_TIMEOUT_S", 60.0, minimum=0.001),
            ),
            cache=CacheConfig(
                enabled=env.bool("CACHE_ENABLED", True),
                ttl_seconds=env.int("CACHE_TTL_S", 3600, minimum=1),
                l1_entries=env.int("CACHE_L1_ENTRIES", 4096, minimum=0),
                semantic=env.bool("SEMANTIC_CACHE", False),
                semantic_threshold=env.float("SEMANTIC_THRESHOLD", 0.95, minimum=0.0),
                redis_prefix=env.str("REDIS_PREFIX", "ragfleet:gw:"),
            ),
            conversations=ConversationConfig(
                ttl_seconds=env.int("CONVERSATION_TTL_S", 86400, minimum=1),
                max_turns=env.int("CONVERSATION_MAX_TURNS", 20, minimum=2),
            ),
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
    if ingest.max_documents > MAX_DOC_IDS_PER_DELETE:
        raise ConfigError(f"RAGFLEET_GATEWAY_MAX_DOCUMENTS={ingest.max_documents} is more than the "
                          f"{MAX_DOC_IDS_PER_DELETE} doc_ids retrieval accepts in one Delete; lower it")
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
