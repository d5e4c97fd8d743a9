"""The one way a service connects to Redis: ``redis.asyncio`` over a bounded, blocking connection pool.

Redis is an optimisation for every caller (caches, corpus versions, conversations): each one degrades or retries on
its own terms when a command fails, so the client itself fails fast rather than stalling a request.

    client = connect("redis://127.0.0.1:6379/0")        # DEFAULT_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS
    client = connect(url, timeout=0.25)                 # a caller with a tighter budget (embedding's L2)
    ...
    await client.aclose()                               # the client owns its pool: this disconnects it
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Connect and read timeout, and how long a command waits for a free pooled connection.
DEFAULT_TIMEOUT_S = 0.5
# A burst beyond this many concurrent commands waits (up to the timeout) for a free connection: the default pool
# would raise "Too many connections" at once, which reads as an outage.
DEFAULT_MAX_CONNECTIONS = 32
# Seconds a pooled connection may sit idle before it is PINGed on its next use, so a dead one is found early.
HEALTH_CHECK_INTERVAL_S = 30


def connect(url: str, *, timeout: float = DEFAULT_TIMEOUT_S,
            max_connections: int = DEFAULT_MAX_CONNECTIONS) -> aioredis.Redis:
    """A client with its own pool. No redis-py retries: callers own their failure policy (a miss, a back-off, an
    error) and a library retry would only add latency to it. Connections are made lazily, on first use."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, health_check_interval=HEALTH_CHECK_INTERVAL_S, retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_pool(pool)
