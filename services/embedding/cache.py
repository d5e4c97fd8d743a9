"""The two-level embedding cache: L1 in-process (LRU by bytes, TTL), L2 Redis shared by all replicas.

Key = hash of (model id, input type, normalised text), so a model change never serves stale vectors. L2 values are
the raw float32 bytes of the vector. Every request costs Redis at most one pipelined MGET and one pipelined SET
batch. Redis is an optimisation, never a dependency: when it fails the cache logs once, counts the error, skips L2
for a short, growing back-off, then tries again (redis.asyncio reconnects by itself), and requests carry on.
"""

from __future__ import annotations

import hashlib
import logging
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from services.embedding import metrics
from services.embedding.config import CacheConfig

log = logging.getLogger("ragfleet.embedding.cache")

_ENTRY_OVERHEAD = 200  # bytes of bookkeeping per L1 entry (key, node, object headers)
_BACKOFF_START = 0.5
_BACKOFF_MAX = 10.0
_MAX_CONNECTIONS = 32


def normalise_text(text: str) -> str:
    """NFC and collapsed whitespace: the same text typed twice maps to one key (and to the same tokens)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def cache_key(model_id: str, input_type: int, text: str) -> str:
    digest = hashlib.blake2b(f"{model_id}\x1f{input_type}\x1f{text}".encode(), digest_size=16).hexdigest()
    return digest


@dataclass(frozen=True, slots=True)
class CachedVector:
    vector: np.ndarray
    token_count: int
    truncated: bool


class L1Cache:
    """LRU bounded by bytes, entries expire after `ttl` seconds. Event-loop only (no locking)."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[float, CachedVector]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(value: CachedVector) -> int:
        return value.vector.nbytes + _ENTRY_OVERHEAD

    def get(self, key: str) -> CachedVector | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if expires < time.monotonic():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: CachedVector) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (time.monotonic() + self.ttl, value)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
        metrics.L1_BYTES.set(self.bytes)

    def _remove(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= self._size(value)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class L2Cache:
    """Redis through redis.asyncio with a connection pool; failures degrade to 'no L2', never to an error."""

    def __init__(self, url: str, *, prefix: str, ttl_seconds: int, timeout: float, dimension: int) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.dimension = dimension
        # A blocking pool: a burst of more than 32 concurrent requests waits (up to `timeout`) for a free connection;
        # the default pool raises 'Too many connections' at once, which read as an outage and skipped L2.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=_MAX_CONNECTIONS, timeout=timeout,
                                                     socket_timeout=timeout, socket_connect_timeout=timeout,
                                                     health_check_interval=30,
                                                     # Our own back-off handles outages; redis' retries only add delay.
                                                     retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = _BACKOFF_START

    @property
    def available(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def _failed(self, operation: str, exc: Exception, started: float) -> None:
        """Start or extend the back-off. Only a failed probe (an operation started once the back-off had run out)
        doubles it, and only once: requests in flight when Redis went down, or probing alongside, fail together,
        and counting each would keep L2 off for the maximum long after Redis is back."""
        metrics.REDIS_ERRORS.inc()
        now = time.monotonic()
        if self._down_since is None:
            # Log once per outage, not once per request.
            log.warning("redis %s failed, serving without the L2 cache until it is back: %s", operation, exc)
            self._down_since = now
            self._backoff = _BACKOFF_START
        elif started >= self._retry_at:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self._retry_at = now + self._backoff

    def _succeeded(self) -> None:
        if self._down_since is not None:
            log.info("redis is back; L2 cache in use again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None

    async def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """One MGET. Unavailable Redis reads as all misses."""
        if not keys or not self.available:
            return [None] * len(keys)
        started = time.monotonic()
        try:
            raw = await self._client.mget([self.prefix + k for k in keys])
        except Exception as exc:  # noqa: BLE001 - any Redis failure means 'no L2 now'
            self._failed("MGET", exc, started)
            return [None] * len(keys)
        self._succeeded()
        width = self.dimension * 4
        return [np.frombuffer(v, dtype=np.float32) if v is not None and len(v) == width else None for v in raw]

    async def put_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """One pipelined round trip of SET key value EX ttl."""
        if not items or not self.available:
            return
        started = time.monotonic()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, vector in items:
                    pipe.set(self.prefix + key, np.asarray(vector, dtype=np.float32).tobytes(), ex=self.ttl_seconds)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed("SET", exc, started)
            return
        self._succeeded()

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection must not fail shutdown
            pass


def build_l2(config: CacheConfig, dimension: int) -> L2Cache | None:
    if not config.redis_url:
        return None
    return L2Cache(config.redis_url, prefix=config.l2_prefix, ttl_seconds=config.l2_ttl_seconds,
                   timeout=config.l2_timeout_seconds, dimension=dimension)
