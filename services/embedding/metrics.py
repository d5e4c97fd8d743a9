"""Prometheus metrics of the embedding service (served on the metrics port by the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
_TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)

REQUESTS = Counter("ragfleet_embedding_requests_total", "Embed requests accepted for work", ["backend"])
TEXTS = Counter("ragfleet_embedding_texts_total", "Texts in accepted Embed requests", ["backend"])
TRUNCATED = Counter("ragfleet_embedding_truncated_total", "Texts cut to the model's token limit")
OVERLOADED = Counter("ragfleet_embedding_overloaded_total", "Requests refused because the queue was full")
BATCH_SIZE = Histogram("ragfleet_embedding_batch_size", "Texts per model batch", buckets=_SIZE_BUCKETS)
BATCH_TOKENS = Histogram("ragfleet_embedding_batch_tokens", "Padded tokens (texts x longest) per model batch",
                         buckets=(16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
# Modes for prometheus_client's multiprocess mode (several workers, runtime/workers.py): totals, and the worst wait.
QUEUE_DEPTH = Gauge("ragfleet_embedding_queue_depth", "Texts waiting for the model", multiprocess_mode="livesum")
OLDEST_AGE = Gauge("ragfleet_embedding_oldest_wait_seconds",
                   "How long the oldest text still queued has waited (starvation shows here first)",
                   multiprocess_mode="livemax")
QUEUE_WAIT = Histogram("ragfleet_embedding_queue_wait_seconds", "Time a text waited before its batch started",
                       buckets=_TIME_BUCKETS)
MODEL_TIME = Histogram("ragfleet_embedding_model_seconds", "Time of one model batch", buckets=_TIME_BUCKETS)
CACHE_HITS = Counter("ragfleet_embedding_cache_hits_total", "Cache hits", ["level"])
CACHE_MISSES = Counter("ragfleet_embedding_cache_misses_total", "Cache misses", ["level"])
SINGLE_FLIGHT = Counter("ragfleet_embedding_single_flight_joins_total",
                        "Texts that joined a computation already in flight instead of computing again")
REDIS_ERRORS = Counter("ragfleet_embedding_redis_errors_total", "Failed Redis (L2) operations")
L1_BYTES = Gauge("ragfleet_embedding_l1_bytes", "Bytes held by the in-process cache", multiprocess_mode="livesum")
