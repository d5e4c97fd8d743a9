"""The per-tenant corpus version: one Redis key, one format, one writer (retrieval), any number of readers.

Every cache of search results or answers records the version an entry was computed at and serves it only while the
tenant's current version still equals it. Retrieval bumps the version after every write that may have changed the
corpus and returns the new one in its Upsert and Delete replies; everything else (the gateway's response cache,
retrieval's own result cache) only reads it, so an ingest through any replica invalidates every replica at once.

Key: ``ragfleet:retrieval:version:<tenant>`` (``KEY_FORMAT``); value: a decimal integer; absent means 0, nothing
written yet. Without Redis the writer keeps its versions in process (one replica).

    versions = CorpusVersions(client)            # the writer: retrieval
    await versions.bump("acme")                  # after each write: the new version, None if Redis failed
    await versions.read("acme")                  # before each lookup: None means "do not cache now"
    await read(client, "acme")                   # a reader elsewhere (raises if Redis does)
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("ragfleet.runtime.corpus_version")

KEY_PREFIX = "ragfleet:retrieval:"


def key_format(prefix: str = KEY_PREFIX) -> str:
    """The key template under a prefix (tests and isolated deployments use their own prefix)."""
    return prefix + "version:{tenant}"


KEY_FORMAT = key_format()

# The new version is max(stored, ARGV[1]) + 1, atomically: ARGV[1] is the highest version the writer has seen, so a
# flushed or evicted key never makes it hand out a version again that entries may still be keyed on. (SET of the
# string and INCR keep the arithmetic in Redis integers.)
_BUMP_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('INCR', KEYS[1])
"""


def version_key(tenant: str, template: str = KEY_FORMAT) -> str:
    return template.format(tenant=tenant)


def parse(raw: bytes | str | None) -> int:
    """A stored value as a version (absent: 0)."""
    return int(raw or 0)


async def read(client: Any, tenant: str, *, template: str = KEY_FORMAT) -> int:
    """The tenant's current version, for readers; a Redis failure raises (the caller decides what it means)."""
    return parse(await client.get(version_key(tenant, template)))


class CorpusVersions:
    """The writer's side, kept by retrieval: bump after each write, read before each lookup.

    A bump that fails is remembered and retried before any version is read again: until it lands, ``read`` returns
    None (no caching), since the version in Redis still admits entries computed before the write."""

    def __init__(self, client: Any | None, *, template: str = KEY_FORMAT) -> None:
        self._client = client
        self._template = template
        self._bump = client.register_script(_BUMP_SCRIPT) if client is not None else None
        self._local: dict[str, int] = {}  # without Redis: the versions themselves; never mixed with Redis ones
        self._seen: dict[str, int] = {}  # with Redis: the highest version read or written, the floor of a bump
        self._pending: dict[str, int] = {}  # tenant -> its latest failed bump (numbered) not yet made in Redis
        self._failures = 0

    async def read(self, tenant: str) -> int | None:
        """The tenant's version; None when Redis is configured but failing (then do not cache)."""
        if self._client is None:
            return self._local.get(tenant, 0)
        if self._pending and not await self._land_pending():
            return None
        try:
            version = await read(self._client, tenant, template=self._template)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "no cache", never an error
            log.warning("redis unavailable for corpus version: %s", exc)
            return None
        self._remember(tenant, version)
        return version

    async def bump(self, tenant: str) -> int | None:
        """Advance the tenant's version after a write; the new version, or None if Redis is failing (the bump is
        then retried before the next read)."""
        if self._client is None:
            self._local[tenant] = self._local.get(tenant, 0) + 1
            return self._local[tenant]
        try:
            return await self._advance(tenant)
        except Exception as exc:  # noqa: BLE001
            log.warning("redis unavailable for version bump of tenant %r (retried before the next read): %s",
                        tenant, exc)
            self._failures += 1
            self._pending[tenant] = self._failures
            return None

    async def _advance(self, tenant: str) -> int:
        assert self._bump is not None
        version = int(await self._bump(keys=[version_key(tenant, self._template)], args=[self._seen.get(tenant, 0)]))
        self._remember(tenant, version)
        return version

    def _remember(self, tenant: str, version: int) -> None:
        if version > self._seen.get(tenant, 0):
            self._seen[tenant] = version

    async def _land_pending(self) -> bool:
        """Bump every tenant whose bump has not reached Redis yet; False while Redis still fails."""
        for tenant, failure in list(self._pending.items()):
            try:
                await self._advance(tenant)
            except Exception as exc:  # noqa: BLE001
                log.warning("redis still unavailable for a pending version bump: %s", exc)
                return False
            if self._pending.get(tenant) == failure:  # a bump that failed meanwhile needs a bump after it
                del self._pending[tenant]
        return True
