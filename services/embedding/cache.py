"""The two-level embedding cache: L1 in-process (LRU by bytes, TTL), L2 Redis shared by all replicas.

Key = hash of (model id, input type, normalised text), so a model change never serves stale vectors. L2 values are
the raw float32 bytes of the vector. Both levels are the runtime's (``runtime.lru``, ``runtime.l2``): every request
costs Redis at most one MGET and one pipelined SET batch, and a failing Redis means a short, growing back-off without
L2 (logged once, counted in ``ragfleet_embedding_redis_errors_total``), never a failed request.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass

import numpy as np

from services.embedding import metrics
from services.embedding.config import CacheConfig
from services.runtime import redis_client
from services.runtime.l2 import RedisL2
from services.runtime.lru import LruCache

log = logging.getLogger("ragfleet.embedding.cache")

_ENTRY_OVERHEAD = 200  # bytes of bookkeeping per L1 entry (key, node, object headers)


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


def _l1_size(value: CachedVector) -> int:
    return value.vector.nbytes + _ENTRY_OVERHEAD


class L1Cache(LruCache[CachedVector]):
    """The runtime LRU bounded by bytes, publishing its size as a gauge."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        super().__init__(max_bytes=max_bytes, ttl=ttl, size_of=_l1_size)

    def put(self, key: str, value: CachedVector, *, ttl: float | None = None) -> None:
        super().put(key, value, ttl=ttl)
        metrics.L1_BYTES.set(self.bytes)


class L2Cache(RedisL2[np.ndarray]):
    """The runtime L2 over its own Redis client, holding each vector as its raw float32 bytes."""

    def __init__(self, url: str, *, prefix: str, ttl_seconds: int, timeout: float, dimension: int) -> None:
        super().__init__(redis_client.connect(url, timeout=timeout), prefix=prefix, ttl_seconds=ttl_seconds, log=log,
                         errors=metrics.REDIS_ERRORS)
        self.dimension = dimension

    def _encode(self, value: np.ndarray) -> bytes:
        return np.asarray(value, dtype=np.float32).tobytes()

    def _decode(self, raw: bytes) -> np.ndarray | None:
        """A value of the wrong size (another model's, or corrupt) is a miss, never a vector."""
        return np.frombuffer(raw, dtype=np.float32) if len(raw) == self.dimension * 4 else None

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
