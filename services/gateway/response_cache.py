"""The corpus-versioned response cache: exact (L1 + Redis) and optional semantic (L1) matches.

Invariants:
- Every key starts with the tenant, and a semantic match only looks at the caller's tenant: nothing crosses tenants.
- A semantic match also needs the same request fingerprint (filters, top_k, mode, generation params) as the entry:
  only the question may differ, never what else shapes the answer.
- Every entry expires ``ttl_seconds`` after it was stored, in Redis and in this process (L1 and semantic) alike.
- Every entry records the tenant's corpus version it was computed at; a lookup first reads the CURRENT version and
  serves an entry only if the two are equal. The current version lives in Redis (``corpus_version_key``), so an
  ingest through any gateway replica invalidates every replica at once. It is bumped after every write with a value
  that never repeats (max(old + 1, now in microseconds)), so even a Redis flush cannot resurrect an old entry.
- Exact lookups cost one Redis round trip: the version and the entry (with its remaining TTL, so an L1 copy expires
  with the Redis one) come back in one pipeline (the L1 copy saves only the payload; the version is always read).
- If Redis fails, the cache steps aside (miss, no store) rather than risk a stale answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from prometheus_client import Counter, Gauge

from services.gateway.config import CacheConfig

log = logging.getLogger("ragfleet.gateway.cache")

CACHE_LOOKUPS = Counter("ragfleet_gateway_cache_lookups_total", "Response-cache lookups by result", ["result"])
CACHE_HIT_RATIO = Gauge("ragfleet_gateway_cache_hit_ratio", "Response-cache hits / lookups since start")

# Bump to max(current + 1, now_us): monotonic, and never equal to a value used before a flush.
_BUMP_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local nxt = math.max(current + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], nxt)
return nxt
"""


def normalise_question(question: str) -> str:
    """Case-, width- and whitespace-insensitive form: "  What IS  RAG? " and "what is rag" share an entry."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return " ".join(text.split()).strip(" ?!.")


def cache_key(prefix: str, tenant: str, question: str, fingerprint: bytes) -> str:
    """`<prefix>ans:<tenant>:<sha256(question, fingerprint)>`; the fingerprint covers everything else that shapes
    the answer (generation params, top_k, filters, search mode)."""
    digest = hashlib.sha256(normalise_question(question).encode() + b"\x00" + fingerprint).hexdigest()
    return f"{prefix}ans:{tenant}:{digest}"


@dataclass(frozen=True)
class CachedAnswer:
    version: int
    answer: str
    sources: bytes  # serialized gateway_pb2.Sources
    finish_reason: int
    usage: tuple[int, int, int]
    model: str

    def to_bytes(self) -> bytes:
        return json.dumps({"v": self.version, "a": self.answer, "s": self.sources.hex(), "f": self.finish_reason,
                           "u": list(self.usage), "m": self.model}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CachedAnswer":
        data = json.loads(raw)
        return cls(version=int(data["v"]), answer=data["a"], sources=bytes.fromhex(data["s"]),
                   finish_reason=int(data["f"]), usage=tuple(data["u"]), model=data["m"])  # type: ignore[arg-type]


def fingerprint_digest(fingerprint: bytes) -> str:
    """Stable id of a request fingerprint: semantic entries only match requests with the same one."""
    return hashlib.sha256(fingerprint).hexdigest()


@dataclass(frozen=True)
class _LocalEntry:
    answer: CachedAnswer
    expires: float  # time.monotonic() after which the entry counts as absent


@dataclass(frozen=True)
class _SemanticEntry:
    vector: np.ndarray
    answer: CachedAnswer
    fingerprint: str  # fingerprint_digest of the request that produced the answer
    expires: float


class ResponseCache:
    def __init__(self, config: CacheConfig, redis: Any | None) -> None:
        self.config = config
        self._redis = redis
        self._l1: OrderedDict[str, _LocalEntry] = OrderedDict()
        self._local_versions: dict[str, int] = {}
        self._semantic: dict[str, list[_SemanticEntry]] = {}
        self._bump = redis.register_script(_BUMP_SCRIPT) if redis is not None else None
        self._lookups = 0
        self._hits = 0

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def key(self, tenant: str, question: str, fingerprint: bytes) -> str:
        return cache_key(self.config.redis_prefix, tenant, question, fingerprint)

    def _version_key(self, tenant: str) -> str:
        return self.config.corpus_version_key.format(tenant=tenant)

    # -- corpus version ---------------------------------------------------------------------------------------------

    async def current_version(self, tenant: str) -> int:
        if self._redis is None:
            return self._local_versions.get(tenant, 0)
        raw = await self._redis.get(self._version_key(tenant))
        return int(raw or 0)

    async def bump_version(self, tenant: str) -> int:
        """Invalidate every entry of the tenant on every replica; call after each acknowledged write."""
        self._drop_tenant_l1(tenant)
        if self._redis is None:
            self._local_versions[tenant] = self._local_versions.get(tenant, 0) + 1
            return self._local_versions[tenant]
        return int(await self._bump(keys=[self._version_key(tenant)], args=[time.time_ns() // 1000]))

    def _drop_tenant_l1(self, tenant: str) -> None:
        self._semantic.pop(tenant, None)

    # -- lookups ----------------------------------------------------------------------------------------------------

    def has_local(self, key: str | None) -> bool:
        """Whether L1 holds an unexpired entry for the key (valid or not: only a lookup checks the corpus version)."""
        return key is not None and self._local(key) is not None

    def _local(self, key: str) -> CachedAnswer | None:
        """The L1 entry for the key, dropping it if its TTL has run out."""
        local = self._l1.get(key)
        if local is None:
            return None
        if local.expires <= time.monotonic():
            del self._l1[key]
            return None
        return local.answer

    async def lookup(self, tenant: str, key: str) -> tuple[int | None, CachedAnswer | None]:
        """Return (current corpus version, entry if one is valid at that version). The version is None when the
        cache cannot be trusted right now (Redis error): the caller must then neither serve nor store."""
        local = self._local(key)
        remaining = 0.0
        try:
            if self._redis is None:
                version = self._local_versions.get(tenant, 0)
                entry = local
            elif local is not None:
                version = int(await self._redis.get(self._version_key(tenant)) or 0)
                entry = local
            else:
                version, entry, remaining = await self._fetch(tenant, key)
        except Exception as exc:  # noqa: BLE001 - a broken cache must not break Ask
            log.warning("response cache unavailable, skipping it: %s", exc)
            return None, None
        if entry is not None and entry.version != version:
            self._l1.pop(key, None)
            entry = None
        if entry is not None and local is None:
            # L1 keeps it only as long as Redis does.
            self._remember(key, entry, time.monotonic() + remaining)
        elif entry is not None and key in self._l1:
            self._l1.move_to_end(key)
        return version, entry

    async def _fetch(self, tenant: str, key: str) -> tuple[int, CachedAnswer | None, float]:
        """(current version, Redis entry, the entry's remaining seconds) in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.mget([self._version_key(tenant), key])
            pipe.pttl(key)
            (raw_version, raw_entry), pttl = await pipe.execute()
        ttl = float(self.config.ttl_seconds)
        remaining = ttl if pttl is None or pttl < 0 else min(pttl / 1000.0, ttl)
        entry = CachedAnswer.from_bytes(raw_entry) if raw_entry and remaining > 0 else None
        return int(raw_version or 0), entry, remaining

    def lookup_semantic(self, tenant: str, version: int, vector: Sequence[float], *,
                        fingerprint: bytes) -> CachedAnswer | None:
        """Closest cached question of the same tenant, corpus version and request fingerprint, if its cosine
        clears the threshold. The fingerprint keeps e.g. an answer filtered to one document from answering the
        same question filtered to another."""
        digest = fingerprint_digest(fingerprint)
        now = time.monotonic()
        entries = [e for e in self._semantic.get(tenant, ())
                   if e.answer.version == version and e.fingerprint == digest and e.expires > now]
        if not entries or not vector:
            return None
        query = np.asarray(vector, dtype=np.float32)
        query /= max(float(np.linalg.norm(query)), 1e-12)
        scores = np.stack([e.vector for e in entries]) @ query
        best = int(np.argmax(scores))
        if float(scores[best]) >= self.config.semantic_threshold:
            return entries[best].answer
        return None

    def record(self, result: str) -> None:
        """Count one Ask's cache outcome: hit_exact, hit_semantic, miss, bypass or error (bypass is not a lookup)."""
        CACHE_LOOKUPS.labels(result).inc()
        if result != "bypass":
            self._lookups += 1
            self._hits += result.startswith("hit")
            CACHE_HIT_RATIO.set(self._hits / self._lookups)

    # -- stores -----------------------------------------------------------------------------------------------------

    async def store(self, tenant: str, key: str, entry: CachedAnswer, vector: Sequence[float] | None, *,
                    fingerprint: bytes) -> None:
        """Keep the answer in L1 (and the semantic index, under its request fingerprint) and in Redis, each for
        ``ttl_seconds``. The local copies are kept first, so a Redis write cut short still leaves them."""
        expires = time.monotonic() + self.config.ttl_seconds
        self._remember(key, entry, expires)
        if self.config.semantic and vector:
            self._remember_semantic(tenant, entry, vector, fingerprint_digest(fingerprint), expires)
        if self._redis is not None:
            try:
                await self._redis.set(key, entry.to_bytes(), ex=self.config.ttl_seconds)
            except Exception as exc:  # noqa: BLE001
                log.warning("response cache store failed: %s", exc)

    def _remember(self, key: str, entry: CachedAnswer, expires: float) -> None:
        if self.config.l1_entries <= 0:
            return
        self._l1[key] = _LocalEntry(entry, expires)
        self._l1.move_to_end(key)
        while len(self._l1) > self.config.l1_entries:
            self._l1.popitem(last=False)

    def _remember_semantic(self, tenant: str, entry: CachedAnswer, vector: Sequence[float], fingerprint: str,
                           expires: float) -> None:
        """Add to the tenant's semantic index, dropping entries of older versions or past their TTL."""
        vec = np.asarray(vector, dtype=np.float32)
        vec /= max(float(np.linalg.norm(vec)), 1e-12)
        now = time.monotonic()
        bucket = [e for e in self._semantic.get(tenant, ()) if e.answer.version == entry.version and e.expires > now]
        bucket.append(_SemanticEntry(vec, entry, fingerprint, expires))
        self._semantic[tenant] = bucket[-max(self.config.l1_entries, 1):]
