"""The one Redis client factory: its documented pool and timeouts, and a working connection."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.runtime import redis_client
from tests.conftest import REDIS_URL


async def test_pool_and_timeouts_are_the_documented_ones():
    client = redis_client.connect(REDIS_URL)
    try:
        pool = client.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == redis_client.DEFAULT_MAX_CONNECTIONS and pool.timeout == 0.5
        kwargs = pool.connection_kwargs
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == redis_client.DEFAULT_TIMEOUT_S
        assert kwargs["health_check_interval"] == redis_client.HEALTH_CHECK_INTERVAL_S
        assert await client.ping()
    finally:
        await client.aclose()


async def test_a_caller_may_tighten_the_timeout_and_the_pool():
    client = redis_client.connect(REDIS_URL, timeout=0.1, max_connections=1)
    try:
        assert client.connection_pool.max_connections == 1
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.1
    finally:
        await client.aclose()
