"""The result cache: versions shared through real Redis (two replicas), L1/L2, and life without Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.retrieval.cache import ResultCache
from services.retrieval.config import CacheConfig

from tests.conftest import REDIS_URL


async def test_replicas_share_versions_and_l2(redis_cleanup):
    prefix = redis_cleanup
    a = ResultCache(CacheConfig(size=16, redis_url=REDIS_URL), prefix=prefix)
    b = ResultCache(CacheConfig(size=16, redis_url=REDIS_URL), prefix=prefix)
    try:
        assert await a.version("t") == 0
        key = a.key("t", 0, b"query")
        await a.put(key, b"result")
        assert await a.get(key) == (b"result", "l1_hit")
        assert await b.get(b.key("t", 0, b"query")) == (b"result", "l2_hit")  # written by the other replica
        assert await b.get(b.key("t", 0, b"query")) == (b"result", "l1_hit")
        assert await b.bump("t") == 1  # a write lands on replica b ...
        assert await a.version("t") == 1  # ... and replica a keys its next lookup on the new version
        assert await a.get(a.key("t", 1, b"query")) == (None, "miss")
        assert await a.version("other-tenant") == 0
    finally:
        await a.close()
        await b.close()


async def test_without_redis_versions_are_local():
    cache = ResultCache(CacheConfig(size=2))
    assert await cache.version("t") == 0
    assert await cache.bump("t") == 1 and await cache.bump("t") == 2
    for i in range(3):
        await cache.put(f"k{i}", b"v")
    assert (await cache.get("k0"))[1] == "miss"  # LRU evicted the oldest of three in a size-2 cache
    assert (await cache.get("k2"))[1] == "l1_hit"


async def test_redis_down_means_no_cache_not_errors():
    cache = ResultCache(CacheConfig(size=4, redis_url="redis://127.0.0.1:1/0"))
    assert await cache.version("t") is None  # caller must not cache
    assert await cache.bump("t") is None  # the write still succeeds, but no made-up local version is reported
    assert await cache.version("t") is None  # the bump is pending: still no cache
    await cache.put("k", b"v")  # L2 write failure is logged, not raised
    await cache.close()


def test_keys_differ_by_tenant_version_and_query():
    cache = ResultCache(CacheConfig())
    keys = {cache.key("t", 0, b"q"), cache.key("u", 0, b"q"), cache.key("t", 1, b"q"), cache.key("t", 0, b"r")}
    assert len(keys) == 4


async def test_a_failed_bump_lands_before_the_next_read(redis_cleanup):
    """A write's bump that hit a Redis blip must not let results computed before the write come back once Redis
    recovers: the bump is retried before the next read, and no version is served until it lands."""
    prefix = redis_cleanup
    cache = ResultCache(CacheConfig(size=16, redis_url=REDIS_URL), prefix=prefix)
    other = ResultCache(CacheConfig(size=16, redis_url=REDIS_URL), prefix=prefix)  # another replica
    try:
        for _ in range(3):
            await cache.bump("t")
        before = await cache.version("t")
        stale_key = cache.key("t", before, b"query")
        await cache.put(stale_key, b"computed before the write")
        real_bump = cache._redis.evalsha  # the bump is a script: INCR past the highest version seen
        real_get = cache._redis.get

        async def blip(*args, **kwargs):
            raise ConnectionError("redis blip")

        cache._redis.evalsha = blip  # the write's invalidation fails ...
        assert await cache.bump("t") is None  # ... and reports no version rather than a local number
        cache._redis.get = blip
        assert await cache.version("t") is None  # still failing: no cache
        cache._redis.get = real_get  # GET works again but the bump still fails: the pending bump blocks reads
        assert await cache.version("t") is None
        cache._redis.evalsha = real_bump  # Redis recovers
        after = await cache.version("t")
        assert after is not None and after > before
        assert await cache.get(cache.key("t", after, b"query")) == (None, "miss")
        assert await other.version("t") == after  # every replica now keys on the new version
        assert await cache.bump("t") == after + 1  # versions only move forward, and no bump is left pending
        assert await cache.version("t") == after + 1
    finally:
        await cache.close()
        await other.close()
