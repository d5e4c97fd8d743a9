"""Search result cache keyed by (tenant, query, parameters, corpus version): L1 in-process LRU + L2 Redis.

Correctness rests on the corpus version (``runtime.corpus_version``, owned here: retrieval is its only writer), not
on expiry: every upsert/delete bumps the tenant's version *after* the engine accepted the write, and every lookup
reads the current version first (from the mirror that follows the bumps' messages: another replica's bump arrives
with its message, about a millisecond after it). A result computed before a write can only ever be stored under an
older version, which no later lookup asks for. Without Redis the versions live in this process (one replica) and L2
is skipped. If Redis fails the cache steps aside (no version: no read, no write) rather than risk a stale answer.

    version = await cache.version(tenant)
    hit = await cache.get(key_for(tenant, version, request))
    ...
    await cache.put(key, response_bytes)
    await cache.bump(tenant)    # after each write
"""

from __future__ import annotations

import hashlib
import logging

from services.retrieval.config import CacheConfig
from services.runtime import corpus_version, redis_client
from services.runtime.corpus_version import CorpusVersions
from services.runtime.l2 import RedisL2
from services.runtime.lru import LruCache

log = logging.getLogger("ragfleet.retrieval.cache")

KEY_PREFIX = corpus_version.KEY_PREFIX


class ResultCache:
    def __init__(self, settings: CacheConfig, *, prefix: str = KEY_PREFIX) -> None:
        self.enabled = settings.size > 0
        self.prefix = prefix
        self._l1 = LruCache[bytes](max_entries=settings.size, ttl=settings.ttl_seconds)
        self._redis = redis_client.connect(settings.redis_url) if settings.redis_url else None
        self._l2 = (RedisL2[bytes](self._redis, ttl_seconds=int(settings.ttl_seconds), log=log)
                    if self._redis is not None else None)
        self._versions = CorpusVersions(self._redis, template=corpus_version.key_format(prefix))

    async def version(self, tenant: str) -> int | None:
        """The tenant's corpus version; None when Redis is configured but failing (then do not cache)."""
        return await self._versions.read(tenant)

    async def bump(self, tenant: str) -> int | None:
        """Advance the tenant's version after a write; the new version, or None if Redis is failing (no version is
        then served, so nothing is cached, until the bump has landed)."""
        return await self._versions.bump(tenant)

    def key(self, tenant: str, version: int, fingerprint: bytes) -> str:
        digest = hashlib.sha256(tenant.encode() + b"\x1f" + fingerprint).hexdigest()[:40]
        return f"{self.prefix}result:{tenant}:{version}:{digest}"

    async def get(self, key: str) -> tuple[bytes | None, str]:
        """(value, "l1_hit" | "l2_hit" | "miss")."""
        value = self._l1.get(key)
        if value is not None:
            return value, "l1_hit"
        if self._l2 is not None and (value := await self._l2.get(key)) is not None:
            self._l1.put(key, value)
            return value, "l2_hit"
        return None, "miss"

    async def put(self, key: str, value: bytes) -> None:
        self._l1.put(key, value)
        if self._l2 is not None:
            await self._l2.put(key, value)

    async def close(self) -> None:
        await self._versions.close()
        if self._redis is not None:
            await self._redis.aclose()
