"""The corpus-versioned response cache: exact (L1 + Redis) and optional semantic (L1) matches.

Invariants:
- Every key starts with the tenant, and a semantic match only looks at the caller's tenant: nothing crosses tenants.
- A semantic match also needs the same request fingerprint (filters, top_k, mode, generation params) as the entry:
  only the question may differ, never what else shapes the answer.
- Every entry expires ``ttl_seconds`` after it was stored, in Redis and in this process (L1 and semantic) alike.
- Every entry records the tenant's corpus version it was computed at; a lookup first reads the CURRENT version and
  serves an entry only if the two are equal. The current version lives in Redis (``runtime.corpus_version``), where
  retrieval, its only writer, advances it after every write and publishes it; the gateway only reads it, through a
  ``VersionMirror`` that follows those messages, so an ingest through any replica invalidates every replica with
  its message (about a millisecond), and this replica's own ingest at once (``note_version``). Without Redis this
  process counts the writes it sends instead.
- An L1 hit costs no Redis command while the mirror is live (else one GET of the version). An L1 miss costs one:
  the version and the entry (with its remaining TTL, so an L1 copy expires with the Redis one) come back from one
  server-side script.
- If Redis fails, the cache steps aside (miss, no store) rather than risk a stale answer.
- An answer is kept in this process (L1, semantic index) before the Ask finishes; its Redis copy is written in the
  background (``store_later``), off the Ask's critical path: at most ``MAX_PENDING_WRITES`` at once, each within
  its budget, skipped and counted beyond either (``ragfleet_gateway_cache_store_failures_total``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from prometheus_client import Counter, Gauge

from services.gateway.config import CacheConfig
from services.runtime import corpus_version
from services.runtime.l2 import RedisL2
from services.runtime.lru import LruCache

log = logging.getLogger("ragfleet.gateway.cache")

CACHE_LOOKUPS = Counter("ragfleet_gateway_cache_lookups_total", "Response-cache lookups by result", ["result"])
# With several workers, the last one to update it: the pod's exact ratio is cache_lookups_total's (the dashboards').
CACHE_HIT_RATIO = Gauge("ragfleet_gateway_cache_hit_ratio", "Response-cache hits / lookups since start",
                        multiprocess_mode="livemostrecent")
CACHE_STORE_FAILURES = Counter("ragfleet_gateway_cache_store_failures_total",
                               "Response-cache Redis writes that did not land, by reason: error (Redis failed), "
                               "timeout (past the cache budget), overflow (too many writes pending)", ["reason"])
# The outcomes of a lookup (record()), their counter children looked up once.
LOOKUP_RESULTS = ("hit_exact", "hit_semantic", "miss", "bypass", "error")
_LOOKUP_COUNTERS = {result: CACHE_LOOKUPS.labels(result) for result in LOOKUP_RESULTS}
_STORE_FAILED = {reason: CACHE_STORE_FAILURES.labels(reason) for reason in ("error", "timeout", "overflow")}

# Background Redis writes of answers (store_later) in flight at once; beyond it a write is skipped (its L1 copy stays).
MAX_PENDING_WRITES = 256

# The current version, the entry and the entry's remaining TTL in ms, in one command (see ResponseCache._fetch).
_FETCH_SCRIPT = """
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), redis.call('PTTL', KEYS[2])}
"""


def normalise_question(question: str) -> str:
    """Case-, width- and whitespace-insensitive form: "  What IS  RAG? " and "what is rag" share an entry."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return " ".join(text.split()).strip(" ?!.")


def cache_key(prefix: str, tenant: str, question: str, fingerprint: bytes) -> str:
    """`<prefix>ans:<tenant>:<sha256(question, fingerprint)>`; the fingerprint covers everything else that shapes
    the answer (generation params, top_k, filters, search mode)."""
    digest = hashlib.sha256(normalise_question(question).encode() + b"\x00" + fingerprint).hexdigest()
    return _tenant_keys(prefix, tenant) + digest


def _tenant_keys(prefix: str, tenant: str) -> str:
    """What every key of the tenant starts with."""
    return f"{prefix}ans:{tenant}:"


# An entry in Redis: this header (magic, version, finish reason, usage, byte lengths of model and answer), then the
# model and the answer in UTF-8, then the serialized Sources as they are. The JSON with the Sources in hex that came
# before cost ~50 us to write and ~40 us to read an entry, at twice the bytes; from_bytes still reads it.
_MAGIC = b"RFA1"
_HEADER = struct.Struct("<4sqi3qII")


@dataclass(frozen=True)
class CachedAnswer:
    version: int
    answer: str
    sources: bytes  # serialized gateway_pb2.Sources
    finish_reason: int
    usage: tuple[int, int, int]
    model: str
    # The messages a hit replays before its AskFinished, built by the first hit served from this entry
    # (services.gateway.ask) and shared by the later ones; not part of the entry's value.
    replay: list[Any] = field(default_factory=list, compare=False, repr=False)

    def to_bytes(self) -> bytes:
        model, answer = self.model.encode(), self.answer.encode()
        return b"".join((_HEADER.pack(_MAGIC, self.version, self.finish_reason, *self.usage, len(model), len(answer)),
                         model, answer, self.sources))

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CachedAnswer":
        if raw[:4] != _MAGIC:
            return cls._from_json(raw)
        _, version, finish_reason, prompt, completion, total, model_len, answer_len = _HEADER.unpack_from(raw)
        start = _HEADER.size
        view = memoryview(raw)
        model = str(view[start:start + model_len], "utf-8")
        start += model_len
        answer = str(view[start:start + answer_len], "utf-8")
        return cls(version=version, answer=answer, sources=bytes(view[start + answer_len:]),
                   finish_reason=finish_reason, usage=(prompt, completion, total), model=model)

    @classmethod
    def _from_json(cls, raw: bytes) -> "CachedAnswer":
        """An entry in the earlier format (a replica of the previous release may still write them)."""
        data = json.loads(raw)
        return cls(version=int(data["v"]), answer=data["a"], sources=bytes.fromhex(data["s"]),
                   finish_reason=int(data["f"]), usage=tuple(data["u"]), model=data["m"])  # type: ignore[arg-type]


def fingerprint_digest(fingerprint: bytes) -> str:
    """Stable id of a request fingerprint: semantic entries only match requests with the same one."""
    return hashlib.sha256(fingerprint).hexdigest()


@dataclass(frozen=True)
class _SemanticEntry:
    tenant: str
    vector: np.ndarray
    answer: CachedAnswer
    fingerprint: str  # fingerprint_digest of the request that produced the answer


class ResponseCache:
    def __init__(self, config: CacheConfig, redis: Any | None) -> None:
        self.config = config
        self._redis = redis
        self._l1 = LruCache[CachedAnswer](max_entries=config.l1_entries, ttl=config.ttl_seconds)
        # Keyed like L1 (one entry per exact key); a lookup scans the unexpired entries of its tenant.
        self._semantic = LruCache[_SemanticEntry](max_entries=max(config.l1_entries, 1), ttl=config.ttl_seconds)
        self._l2 = RedisL2[bytes](redis, ttl_seconds=config.ttl_seconds, log=log,
                                  errors=_STORE_FAILED["error"]) if redis is not None else None
        self._fetch_script = redis.register_script(_FETCH_SCRIPT) if redis is not None else None
        self._local_versions: dict[str, int] = {}  # only without Redis
        # With Redis: the versions, followed through retrieval's change messages (no round trip on an L1 hit).
        self._versions = corpus_version.VersionMirror(redis, template=config.corpus_version_key) \
            if redis is not None else None
        self._lookups = 0
        self._hits = 0
        self._writes: set[asyncio.Task[None]] = set()  # store_later's Redis writes in flight

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def key(self, tenant: str, question: str, fingerprint: bytes) -> str:
        return cache_key(self.config.redis_prefix, tenant, question, fingerprint)

    def _version_key(self, tenant: str) -> str:
        return corpus_version.version_key(tenant, self.config.corpus_version_key)

    # -- corpus version ---------------------------------------------------------------------------------------------

    async def current_version(self, tenant: str) -> int:
        if self._versions is None:
            return self._local_versions.get(tenant, 0)
        return await self._versions.read(tenant)

    def note_version(self, tenant: str, version: int) -> None:
        """A version retrieval returned for a write this process sent: its own next lookups see the write at once,
        whether or not the change message has arrived yet."""
        if self._versions is not None and version > 0:
            self._versions.observe(tenant, version)

    def note_write(self, tenant: str) -> None:
        """Call after each write this process sent for the tenant, acknowledged or not: drops the tenant's entries
        in this process (exact and semantic). With Redis that only frees their memory early, since retrieval has
        advanced the shared version every lookup checks; without it, the count of writes is this process's version
        of the tenant, advanced here."""
        ours = _tenant_keys(self.config.redis_prefix, tenant)
        self._l1.drop_where(lambda key, _: key.startswith(ours))  # may drop a tenant named "<tenant>:x" too: harmless
        self._semantic.drop_where(lambda _, entry: entry.tenant == tenant)
        if self._versions is not None:
            self._versions.forget(tenant)  # read it from Redis next time (or from note_version's reply)
        else:
            self._local_versions[tenant] = self._local_versions.get(tenant, 0) + 1

    # -- lookups ----------------------------------------------------------------------------------------------------

    def has_local(self, key: str | None) -> bool:
        """Whether L1 holds an unexpired entry for the key (valid or not: only a lookup checks the corpus version)."""
        return key is not None and self._l1.get(key) is not None

    def lookup_hot(self, tenant: str, key: str) -> tuple[int, CachedAnswer] | None:
        """(version, entry) when L1 holds a valid entry and the version is known without I/O (the mirror is live and
        fresh): the cached Ask's whole lookup, with no await. None: ask ``lookup``."""
        if self._versions is None:
            return None
        version = self._versions.known(tenant)
        if version is None:
            return None
        entry = self._l1.get(key)
        return (version, entry) if entry is not None and entry.version == version else None

    async def lookup(self, tenant: str, key: str) -> tuple[int | None, CachedAnswer | None]:
        """Return (current corpus version, entry if one is valid at that version). The version is None when the
        cache cannot be trusted right now (Redis error): the caller must then neither serve nor store."""
        local = self._l1.get(key)
        remaining = 0.0
        if self._versions is not None:
            self._versions.start()  # follow the versions from the first lookup on (a no-op once it runs)
        try:
            if self._redis is None or local is not None:
                version = await self.current_version(tenant)
                entry = local
            else:
                version, entry, remaining = await self._fetch(tenant, key)
        except Exception as exc:  # noqa: BLE001 - a broken cache must not break Ask
            log.warning("response cache unavailable, skipping it: %s", exc)
            return None, None
        if entry is not None and entry.version != version:
            self._l1.pop(key)
            entry = None
        if entry is not None and local is None:
            self._l1.put(key, entry, ttl=remaining)  # L1 keeps it only as long as Redis does
        return version, entry

    async def _fetch(self, tenant: str, key: str) -> tuple[int, CachedAnswer | None, float]:
        """(current version, Redis entry, the entry's remaining seconds) in one command: a script doing GET, GET,
        PTTL (a pipeline of MGET and PTTL, as before, is the same round trip at ~1.5x the client's CPU)."""
        assert self._fetch_script is not None
        raw_version, raw_entry, pttl = await self._fetch_script(keys=[self._version_key(tenant), key])
        ttl = float(self.config.ttl_seconds)
        remaining = ttl if pttl is None or pttl < 0 else min(pttl / 1000.0, ttl)
        entry = CachedAnswer.from_bytes(raw_entry) if raw_entry and remaining > 0 else None
        return corpus_version.parse(raw_version), entry, remaining

    def lookup_semantic(self, tenant: str, version: int, vector: Sequence[float], *,
                        fingerprint: bytes) -> CachedAnswer | None:
        """Closest cached question of the same tenant, corpus version and request fingerprint, if its cosine
        clears the threshold. The fingerprint keeps e.g. an answer filtered to one document from answering the
        same question filtered to another."""
        digest = fingerprint_digest(fingerprint)
        entries = [e for e in self._semantic.values()
                   if e.tenant == tenant and e.answer.version == version and e.fingerprint == digest]
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
        counter = _LOOKUP_COUNTERS.get(result)
        (counter if counter is not None else CACHE_LOOKUPS.labels(result)).inc()
        if result != "bypass":
            self._lookups += 1
            self._hits += result.startswith("hit")
            CACHE_HIT_RATIO.set(self._hits / self._lookups)

    # -- stores -----------------------------------------------------------------------------------------------------

    async def store(self, tenant: str, key: str, entry: CachedAnswer, vector: Sequence[float] | None, *,
                    fingerprint: bytes) -> None:
        """Keep the answer in L1 (and the semantic index, under its request fingerprint) and in Redis, each for
        ``ttl_seconds``. The local copies are kept first, so a Redis write cut short still leaves them."""
        self._keep_local(tenant, key, entry, vector, fingerprint)
        if self._l2 is not None:
            await self._l2.put(key, entry.to_bytes())

    def store_later(self, tenant: str, key: str, entry: CachedAnswer, vector: Sequence[float] | None, *,
                    fingerprint: bytes, timeout: float) -> None:
        """``store`` with the Redis write in the background: the local copies are kept now (this replica serves the
        answer from its next lookup on); the Redis copy, for the other replicas, follows within ``timeout`` seconds.
        A write that fails, times out or finds ``MAX_PENDING_WRITES`` already in flight is skipped: logged (by the
        L2, once per outage) and counted in ragfleet_gateway_cache_store_failures_total. ``flush`` awaits them."""
        self._keep_local(tenant, key, entry, vector, fingerprint)
        if self._l2 is None or not self._l2.available:
            return
        if len(self._writes) >= MAX_PENDING_WRITES:
            _STORE_FAILED["overflow"].inc()
            return
        task = asyncio.ensure_future(self._write(key, entry.to_bytes(), timeout))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, raw: bytes, timeout: float) -> None:
        assert self._l2 is not None
        try:
            async with asyncio.timeout(timeout):
                await self._l2.put(key, raw)  # the L2 itself never raises a Redis failure
        except TimeoutError:
            _STORE_FAILED["timeout"].inc()
            log.warning("response cache store skipped: Redis did not answer within %.0f ms", timeout * 1000)
        except Exception:  # noqa: BLE001 - a background task has no caller to raise to
            _STORE_FAILED["error"].inc()
            log.exception("response cache store failed")

    @property
    def pending_writes(self) -> int:
        return len(self._writes)

    async def flush(self) -> None:
        """Wait for the background Redis writes in flight (each is bounded by its timeout): at shutdown, before
        the Redis client closes, and in tests that read an answer through another replica."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def close(self) -> None:
        """Flush, then stop following the corpus versions (before the Redis client closes)."""
        await self.flush()
        if self._versions is not None:
            await self._versions.close()

    def _keep_local(self, tenant: str, key: str, entry: CachedAnswer, vector: Sequence[float] | None,
                    fingerprint: bytes) -> None:
        self._l1.put(key, entry)
        if self.config.semantic and vector:
            vec = np.asarray(vector, dtype=np.float32)
            vec /= max(float(np.linalg.norm(vec)), 1e-12)
            self._semantic.put(key, _SemanticEntry(tenant, vec, entry, fingerprint_digest(fingerprint)))
