"""Prometheus metrics of the retrieval service (one module so names stay consistent)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from services.runtime import redis_client

if TYPE_CHECKING:
    from services.retrieval.store.base import VectorStore

log = logging.getLogger("ragfleet.retrieval.index")

STAGE_SECONDS = Histogram("ragfleet_retrieval_stage_seconds", "Time per search stage",
                          ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
STAGE_CANDIDATES = Histogram("ragfleet_retrieval_stage_candidates", "Candidates leaving each search stage",
                             ["stage"], buckets=(0, 1, 5, 10, 20, 50, 100, 200, 500))
SEARCHES = Counter("ragfleet_retrieval_searches_total", "Searches by effective mode", ["mode"])
CACHE = Counter("ragfleet_retrieval_cache_total", "Result cache lookups", ["result"])  # l1_hit, l2_hit, miss, bypass
UPSERTED = Counter("ragfleet_retrieval_upserted_chunks_total", "Chunks written")
UPSERT_FAILED = Counter("ragfleet_retrieval_upsert_failed_chunks_total", "Chunks a failed batch did not write")
DELETED = Counter("ragfleet_retrieval_deleted_chunks_total", "Chunks deleted")
# Modes for prometheus_client's multiprocess mode (several workers, runtime/workers.py): one store, seen by each.
INDEX_POINTS = Gauge("ragfleet_retrieval_index_points", "Points in the store", multiprocess_mode="livemax")
INDEX_INDEXED = Gauge("ragfleet_retrieval_index_indexed_vectors", "Dense vectors covered by HNSW",
                      multiprocess_mode="livemax")
INDEX_STATE = Gauge("ragfleet_retrieval_index_state", "1 for the store's current index state", ["state"],
                    multiprocess_mode="livemax")
INDEX_STATES = ("empty", "exact", "optimizing", "indexed")
# Reachability of what retrieval depends on, probed every few seconds (alerts: RagfleetQdrantUnreachable,
# RagfleetRedisUnreachable). `store` is the vector store (a Qdrant server, or the embedded engine); `redis` appears
# only when RAGFLEET_REDIS_URL is set.
DEPENDENCY_UP = Gauge("ragfleet_retrieval_dependency_up", "1 if the last probe of a dependency succeeded, else 0",
                      ["dependency"], multiprocess_mode="livemin")  # up only if every process reaches it


async def index_status_task(store: "VectorStore", interval_seconds: float = 5.0,
                            redis_url: str | None = None) -> None:
    """Publish the store's index status as gauges and log each state change (e.g. exact -> indexed); with
    ``redis_url``, also whether Redis answers a PING (its own connection, so a busy cache pool cannot hide it)."""
    previous = None
    client = None
    if redis_url:
        client = redis_client.connect(redis_url, max_connections=1)
    try:
        while True:
            previous = await _report(store, client, previous)
            await asyncio.sleep(interval_seconds)
    finally:
        if client is not None:
            await client.aclose()


async def _report(store: "VectorStore", client: Any, previous: str | None) -> str | None:
    """One probe round; returns the index state now (logged when it changed)."""
    if client is not None:
        try:
            await client.ping()
            DEPENDENCY_UP.labels("redis").set(1)
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            DEPENDENCY_UP.labels("redis").set(0)
            log.warning("redis unreachable: %s", exc)
    try:
        status = await store.status()
    except Exception as exc:  # noqa: BLE001 - a failing engine shows up in RPC errors; keep reporting
        DEPENDENCY_UP.labels("store").set(0)
        log.warning("index status unavailable: %s", exc)
        return previous
    DEPENDENCY_UP.labels("store").set(1)
    INDEX_POINTS.set(status.points)
    INDEX_INDEXED.set(status.indexed_vectors)
    for state in INDEX_STATES:
        INDEX_STATE.labels(state).set(1 if state == status.state else 0)
    if status.state != previous:
        log.info("index status", extra={"fields": {"store": status.store, "state": status.state,
                                                   "points": status.points, "indexed_vectors": status.indexed_vectors,
                                                   "segments": status.segments}})
    return status.state
