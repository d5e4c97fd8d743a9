"""Search result cache keyed by (tenant, query, parameters, corpus version): L1 in-process LRU + L2 Redis.

Correctness rests on the corpus version, not on expiry: every upsert/delete bumps the tenant's version (an INCR in
Redis, so every replica sees it) *after* the engine accepted the write, and every lookup reads the current version
first. A result computed before a write can only ever be stored under an older version, which no later lookup asks
for. Without Redis the versions live in this process (one replica) and L2 is skipped. If Redis fails mid-flight
the cache steps aside (no read, no write) rather than risk a stale answer; a bump that failed is retried before this
replica reads any version again.

    version = await cache.version(tenant)
    hit = await cache.get(key_for(tenant, version, request))
    ...
    await cache.put(key, response_bytes)
    await cache.bump(tenant)    # after each write
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict

from services.retrieval.config import CacheSettings

log = logging.getLogger("ragfleet.retrieval.cache")

KEY_PREFIX = "ragfleet:retrieval:"


class L1:
    """A small LRU with per-entry expiry."""

    def __init__(self, size: int, ttl_seconds: float) -> None:
        self.size = size
        self.ttl = ttl_seconds
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        self._items[key] = (time.monotonic() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


class ResultCache:
    def __init__(self, settings: CacheSettings, *, prefix: str = KEY_PREFIX) -> None:
        self.enabled = settings.size > 0
        self.prefix = prefix
        self.ttl = settings.ttl_seconds
        self._l1 = L1(settings.size, settings.ttl_seconds)
        self._local_versions: dict[str, int] = {}  # only without Redis: never mixed with Redis versions
        self._pending: dict[str, int] = {}  # tenant -> its latest failed bump (numbered) not yet made in Redis
        self._failures = 0
        self._redis = None
        if settings.redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def _version_key(self, tenant: str) -> str:
        return f"{self.prefix}version:{tenant}"

    async def version(self, tenant: str) -> int | None:
        """The tenant's corpus version; None when Redis is configured but failing (then do not cache)."""
        if self._redis is None:
            return self._local_versions.get(tenant, 0)
        if self._pending and not await self._land_pending():
            return None
        try:
            raw = await self._redis.get(self._version_key(tenant))
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "no cache", never an error
            log.warning("redis unavailable for corpus version: %s", exc)
            return None
        return int(raw or 0)

    async def bump(self, tenant: str) -> int | None:
        """Advance the tenant's version after a write; returns the new version, or None if Redis is failing.

        A failed bump is remembered and retried before any version is read again: until it lands no version is
        served (no cache), since the one in Redis still admits entries computed before the write."""
        if self._redis is None:
            self._local_versions[tenant] = self._local_versions.get(tenant, 0) + 1
            return self._local_versions[tenant]
        try:
            return int(await self._redis.incr(self._version_key(tenant)))
        except Exception as exc:  # noqa: BLE001
            log.warning("redis unavailable for version bump of tenant %r (retried before the next read): %s",
                        tenant, exc)
            self._failures += 1
            self._pending[tenant] = self._failures
            return None

    async def _land_pending(self) -> bool:
        """INCR every tenant whose bump has not reached Redis yet; False while Redis still fails."""
        assert self._redis is not None
        for tenant, failure in list(self._pending.items()):
            try:
                await self._redis.incr(self._version_key(tenant))
            except Exception as exc:  # noqa: BLE001
                log.warning("redis still unavailable for a pending version bump: %s", exc)
                return False
            if self._pending.get(tenant) == failure:  # a bump that failed meanwhile needs an INCR after it
                del self._pending[tenant]
        return True

    def key(self, tenant: str, version: int, fingerprint: bytes) -> str:
        digest = hashlib.sha256(tenant.encode() + b"\x1f" + fingerprint).hexdigest()[:40]
        return f"{self.prefix}result:{tenant}:{version}:{digest}"

    async def get(self, key: str) -> tuple[bytes | None, str]:
        """(value, "l1_hit" | "l2_hit" | "miss")."""
        value = self._l1.get(key)
        if value is not None:
            return value, "l1_hit"
        if self._redis is not None:
            try:
                value = await self._redis.get(key)
            except Exception as exc:  # noqa: BLE001
                log.warning("redis L2 read failed: %s", exc)
                value = None
            if value is not None:
                self._l1.put(key, value)
                return value, "l2_hit"
        return None, "miss"

    async def put(self, key: str, value: bytes) -> None:
        self._l1.put(key, value)
        if self._redis is not None:
            try:
                await self._redis.set(key, value, ex=int(self.ttl))
            except Exception as exc:  # noqa: BLE001
                log.warning("redis L2 write failed: %s", exc)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
