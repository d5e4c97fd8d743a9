"""The shared L2 cache: values in Redis with a TTL, where a failing Redis reads as misses and never as an error.

When a command fails the cache logs once per outage, counts the error (if given a counter), and skips Redis for a
short, growing back-off before trying again (redis.asyncio reconnects by itself), so an outage costs a request no
timeout after the first. Every call is one round trip: an MGET, a SET, or one pipeline of SETs.

    l2 = RedisL2[bytes](client, ttl_seconds=600, log=log)
    await l2.put("k", b"v")
    await l2.get("k")                    # b"v", or None if absent, expired or Redis is failing

Subclasses store other types by overriding ``_encode`` / ``_decode`` (embedding keeps raw float32 vectors).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Generic, Sequence, TypeVar

from prometheus_client import Counter

V = TypeVar("V")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0


class RedisL2(Generic[V]):
    def __init__(self, client: Any, *, ttl_seconds: int, log: logging.Logger, prefix: str = "",
                 errors: Counter | None = None) -> None:
        """``client`` is a ``redis.asyncio`` client (see ``runtime.redis_client``), owned by the caller; ``prefix`` is
        prepended to every key; ``errors`` counts failed commands; ``log`` is where outages are reported."""
        self._client = client
        self.ttl_seconds = ttl_seconds
        self.prefix = prefix
        self._log = log
        self._errors = errors
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S

    def _encode(self, value: V) -> bytes:
        return value  # type: ignore[return-value]  # bytes by default; subclasses convert

    def _decode(self, raw: bytes) -> V | None:
        """The stored bytes as a value, or None to treat them as a miss (e.g. the wrong size)."""
        return raw  # type: ignore[return-value]

    @property
    def available(self) -> bool:
        """False while backing off after a failure: calls then skip Redis (misses, no writes)."""
        return self._down_since is None or time.monotonic() >= self._retry_at

    async def get(self, key: str) -> V | None:
        return (await self.get_many([key]))[0]

    async def put(self, key: str, value: V) -> None:
        await self.put_many([(key, value)])

    async def get_many(self, keys: Sequence[str]) -> list[V | None]:
        """One MGET. An unavailable Redis reads as all misses."""
        if not keys or not self.available:
            return [None] * len(keys)
        started = time.monotonic()
        try:
            raw = await self._client.mget([self.prefix + k for k in keys])
        except Exception as exc:  # noqa: BLE001 - any Redis failure means 'no L2 now'
            self._failed("MGET", exc, started)
            return [None] * len(keys)
        self._succeeded()
        return [None if value is None else self._decode(value) for value in raw]

    async def put_many(self, items: Sequence[tuple[str, V]]) -> None:
        """One round trip of SET key value EX ttl (pipelined for several); skipped while Redis is unavailable."""
        if not items or not self.available:
            return
        started = time.monotonic()
        try:
            if len(items) == 1:  # one command: a pipeline of one costs the client ~25 % more CPU
                key, value = items[0]
                await self._client.set(self.prefix + key, self._encode(value), ex=self.ttl_seconds)
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, value in items:
                        pipe.set(self.prefix + key, self._encode(value), ex=self.ttl_seconds)
                    await pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed("SET", exc, started)
            return
        self._succeeded()

    def _failed(self, operation: str, exc: Exception, started: float) -> None:
        """Start or extend the back-off. Only a failed probe (an operation started once the back-off had run out)
        doubles it, and only once: requests in flight when Redis went down, or probing alongside, fail together,
        and counting each would keep L2 off for the maximum long after Redis is back."""
        if self._errors is not None:
            self._errors.inc()
        now = time.monotonic()
        if self._down_since is None:
            # Log once per outage, not once per request.
            self._log.warning("redis %s failed, serving without the L2 cache until it is back: %s", operation, exc)
            self._down_since = now
            self._backoff = BACKOFF_START_S
        elif started >= self._retry_at:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self._retry_at = now + self._backoff

    def _succeeded(self) -> None:
        if self._down_since is not None:
            self._log.info("redis is back; L2 cache in use again after %.1fs", time.monotonic() - self._down_since)
            self._down_since = None
