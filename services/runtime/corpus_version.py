"""The per-tenant corpus version: one Redis key, one format, one writer (retrieval), any number of readers.

Every cache of search results or answers records the version an entry was computed at and serves it only while the
tenant's current version still equals it. Retrieval bumps the version after every write that may have changed the
corpus and returns the new one in its Upsert and Delete replies; everything else (the gateway's response cache,
retrieval's own result cache) only reads it, so an ingest through any replica invalidates every replica at once.

Key: ``ragfleet:retrieval:version:<tenant>`` (``KEY_FORMAT``); value: a decimal integer; absent means 0, nothing
written yet. Without Redis the writer keeps its versions in process (one replica).

Readers keep a mirror (``VersionMirror``) instead of reading the key before every lookup: the bump publishes the new
version on a Redis channel in the same script (``changes_channel``), and each mirror follows that channel, so a
cache hit costs no round trip at all (a GET was ~70 us of wall time and ~40 us of CPU on every cached Ask and every
search). A version the mirror has not heard of, or last heard of more than ``MIRROR_MAX_AGE_S`` ago, is read from
Redis again, and while the subscription is down every read goes to Redis, as before: a silently dead subscription
can make a mirror at most that old.

    versions = CorpusVersions(client)            # the writer: retrieval (it reads through its own mirror)
    await versions.bump("acme")                  # after each write: the new version, None if Redis failed
    await versions.read("acme")                  # before each lookup: None means "do not cache now"
    mirror = VersionMirror(client)               # a reader elsewhere: the gateway
    await mirror.read("acme")                    # the current version (raises if Redis does)
    await mirror.close()
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("ragfleet.runtime.corpus_version")

KEY_PREFIX = "ragfleet:retrieval:"


def key_format(prefix: str = KEY_PREFIX) -> str:
    """The key template under a prefix (tests and isolated deployments use their own prefix)."""
    return prefix + "version:{tenant}"


KEY_FORMAT = key_format()

# The new version is max(stored, ARGV[1]) + 1, atomically: ARGV[1] is the highest version the writer has seen, so a
# flushed or evicted key never makes it hand out a version again that entries may still be keyed on. (SET of the
# string and INCR keep the arithmetic in Redis integers.) The new version is published as "<version>:<tenant>" on
# ARGV[2] in the same script, so no reader can see the key change without the message following it.
_BUMP_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
local version = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[2], version .. ':' .. ARGV[3])
return version
"""

# A mirrored version older than this is read from Redis again: the bound on staleness if the subscription dies
# without the connection noticing (a change message normally arrives within a millisecond of the bump).
MIRROR_MAX_AGE_S = 1.0
# Pause before subscribing again after the subscription failed (reads go to Redis meanwhile).
_RESUBSCRIBE_DELAY_S = 0.5


def version_key(tenant: str, template: str = KEY_FORMAT) -> str:
    return template.format(tenant=tenant)


def changes_channel(template: str = KEY_FORMAT) -> str:
    """The Redis channel the bumps of the versions under `template` are published on (channels are not keys)."""
    return template.split("{tenant}", 1)[0].rstrip(":") + ":changed"


def parse(raw: bytes | str | None) -> int:
    """A stored value as a version (absent: 0)."""
    return int(raw or 0)


async def read(client: Any, tenant: str, *, template: str = KEY_FORMAT) -> int:
    """The tenant's current version, for readers; a Redis failure raises (the caller decides what it means)."""
    return parse(await client.get(version_key(tenant, template)))


class VersionMirror:
    """A reader's copy of the tenants' versions, kept current by the bumps' change messages (Redis pub/sub).

    ``read`` answers from the copy while the subscription is live and the tenant's version was heard of within
    ``max_age`` seconds, else reads Redis (and keeps what it read only if the subscription was live throughout, so a
    change it might have missed is never kept). Versions only grow, so the copy keeps the highest it has seen: a
    message and a GET may arrive in either order. The subscription follows in a task of its own, started on the
    first read; losing it drops the whole copy until it is back."""

    def __init__(self, client: Any, *, template: str = KEY_FORMAT, max_age: float = MIRROR_MAX_AGE_S) -> None:
        self._client = client
        self._template = template
        self._channel = changes_channel(template)
        self._max_age = max_age
        self._versions: dict[str, tuple[int, float]] = {}  # tenant -> (version, when it was last confirmed)
        self._live = False
        self._epoch = 0  # advanced whenever the subscription starts or ends: a GET spanning one is not kept
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()  # set while the subscription is live (tests and start-up wait on it)

    async def read(self, tenant: str) -> int:
        """The tenant's current version; a Redis failure raises (the caller decides what it means)."""
        self.start()
        known = self.known(tenant)
        if known is not None:
            return known
        epoch, live = self._epoch, self._live
        version = await read(self._client, tenant, template=self._template)
        if live and self._live and epoch == self._epoch:
            self._keep(tenant, version)
        return version

    def known(self, tenant: str) -> int | None:
        """The tenant's version if the copy can answer without Redis (subscription live, confirmed within max_age),
        else None: a lookup that must not wait on I/O (a hot cache hit) asks this first."""
        found = self._versions.get(tenant)  # empty unless live: every way out of live clears it (_drop)
        if found is not None and time.monotonic() - found[1] <= self._max_age:
            return found[0]
        return None

    def observe(self, tenant: str, version: int) -> None:
        """A version learnt from the writer itself (its bump, an Upsert reply): kept while the subscription is live,
        so this process reads its own writes at once."""
        if self._live:
            self._keep(tenant, version)

    def forget(self, tenant: str) -> None:
        """Read the tenant's version from Redis next time (after a write whose outcome is unknown)."""
        self._versions.pop(tenant, None)

    def _keep(self, tenant: str, version: int) -> None:
        known = self._versions.get(tenant)
        self._versions[tenant] = (max(version, known[0]) if known is not None else version, time.monotonic())

    def start(self) -> None:
        """Follow the versions from now on (a no-op once following)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="corpus-version-mirror")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._drop()

    def _drop(self) -> None:
        self._live = False
        self._epoch += 1
        self._versions.clear()
        self.subscribed.clear()

    async def _follow(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)  # wakes up to PING a quiet connection
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._drop()  # whatever was kept before may have missed changes
                        self._live = True
                        self.subscribed.set()
                    elif message["type"] == "message":
                        self._heard(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: read Redis directly until subscribed again
                if self._live:
                    log.warning("corpus version subscription lost, reading versions from redis meanwhile: %s", exc)
            finally:
                self._drop()
                try:
                    await asyncio.shield(pubsub.aclose())
                except Exception:  # noqa: BLE001 - the connection is already broken
                    pass
            await asyncio.sleep(_RESUBSCRIBE_DELAY_S)

    def _heard(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        version, _, tenant = text.partition(":")
        try:
            self._keep(tenant, int(version))
        except ValueError:
            log.warning("ignoring a malformed corpus version message on %s: %r", self._channel, text[:100])


class CorpusVersions:
    """The writer's side, kept by retrieval: bump after each write, read before each lookup (through a mirror of
    its own: other replicas of the writer bump too).

    A bump that fails is remembered and retried before any version is read again: until it lands, ``read`` returns
    None (no caching), since the version in Redis still admits entries computed before the write."""

    def __init__(self, client: Any | None, *, template: str = KEY_FORMAT) -> None:
        self._client = client
        self._template = template
        self._channel = changes_channel(template)
        self._bump = client.register_script(_BUMP_SCRIPT) if client is not None else None
        self._mirror = VersionMirror(client, template=template) if client is not None else None
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
        assert self._mirror is not None
        try:
            version = await self._mirror.read(tenant)
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
        assert self._bump is not None and self._mirror is not None
        self._mirror.forget(tenant)  # if the script fails, whether it bumped is unknown: read Redis next time
        version = int(await self._bump(keys=[version_key(tenant, self._template)],
                                       args=[self._seen.get(tenant, 0), self._channel, tenant]))
        self._remember(tenant, version)
        self._mirror.observe(tenant, version)
        return version

    async def close(self) -> None:
        if self._mirror is not None:
            await self._mirror.close()

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
