"""The reachability gauges behind the RagfleetRedisUnreachable / RagfleetQdrantUnreachable alerts: real Redis, a
closed port, the real embedded store, and a store whose engine is closed."""

from __future__ import annotations

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.cli.mesh import free_port
from services.retrieval import metrics
from tests.conftest import REDIS_URL


def _up(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("ragfleet_retrieval_dependency_up", {"dependency": dependency})


async def test_reachable_redis_and_store_read_1_and_the_index_state_is_published(store) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        state = await metrics._report(store, client, None)
    finally:
        await client.aclose()
    assert _up("redis") == 1 and _up("store") == 1
    assert state in metrics.INDEX_STATES
    assert REGISTRY.get_sample_value("ragfleet_retrieval_index_state", {"state": state}) == 1


async def test_unreachable_redis_and_a_failing_store_read_0(store) -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    await store.close()  # a closed engine fails status(), as an unreachable Qdrant server does
    try:
        state = await metrics._report(store, client, "indexed")
    finally:
        await client.aclose()
    assert _up("redis") == 0 and _up("store") == 0
    assert state == "indexed"  # the last known state is kept for the change log
