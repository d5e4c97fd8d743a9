"""The embedding pipeline behind the servicer: cache (L1, then L2), single-flight, then the batcher.

    embedder = Embedder(backend, batcher, l1, l2, truncate=True)
    result = await embedder.embed(["a", "b", "a"], input_type=1)   # "a" is computed once
    result.items[0].vector, result.items[0].cached

Single-flight: a text already being computed (by this request or a concurrent one) is awaited, not recomputed. A
computation whose every waiter has gone is cancelled, so a cancelled RPC's texts leave the queue. Each computation is
written to L2 once, by the first of its waiters to resume.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from services.embedding import metrics
from services.embedding.backends.base import EmbeddingBackend, PreparedText
from services.embedding.batcher import Batcher, Embedded
from services.embedding.cache import CachedVector, L1Cache, L2Cache, cache_key, normalise_text
from services.runtime.errors import InvalidArgument

log = logging.getLogger("ragfleet.embedding")

# Above this many characters a request is tokenized in a worker thread: 40 texts of 100,000 characters took 1.6 s,
# stalling every RPC (health checks too); below it, tokenizing (~30 us a query) is cheaper than the thread hop.
INLINE_PREPARE_CHARS = 20_000


@dataclass(frozen=True, slots=True)
class EmbeddedText:
    vector: np.ndarray
    token_count: int
    truncated: bool
    cached: bool


@dataclass(slots=True)
class EmbedResult:
    items: list[EmbeddedText]
    l1_hits: int = 0
    l2_hits: int = 0
    computed: int = 0
    joined: int = 0
    max_batch_size: int = 0
    max_queue_wait: float = 0.0


@dataclass(slots=True, eq=False)
class _Flight:
    future: asyncio.Future
    prepared: PreparedText
    waiters: int = 0
    stored: bool = False  # claimed for the L2 write, so a hot text is SET once, not once per joining request


@dataclass(slots=True)
class _Pending:
    """Unique texts of one request still to be answered, by cache key."""

    texts: dict[str, str] = field(default_factory=dict)
    prepared: dict[str, PreparedText] = field(default_factory=dict)


class Embedder:
    def __init__(self, backend: EmbeddingBackend, batcher: Batcher, l1: L1Cache | None, l2: L2Cache | None,
                 *, truncate: bool = True) -> None:
        self.backend = backend
        self.batcher = batcher
        self.l1 = l1
        self.l2 = l2
        self.truncate = truncate
        self._flights: dict[str, _Flight] = {}
        self._name = type(backend).__name__
        # Metric children looked up once: labels() on every Embed was 2.7 % of the service's samples (py-spy).
        self._requests = metrics.REQUESTS.labels(self._name)
        self._texts = metrics.TEXTS.labels(self._name)
        self._l1_hits, self._l1_misses = metrics.CACHE_HITS.labels("l1"), metrics.CACHE_MISSES.labels("l1")
        self._l2_hits, self._l2_misses = metrics.CACHE_HITS.labels("l2"), metrics.CACHE_MISSES.labels("l2")

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def dimension(self) -> int:
        return self.backend.dimension

    async def embed(self, texts: Sequence[str], input_type: int, *, bypass_cache: bool = False) -> EmbedResult:
        self._requests.inc()
        self._texts.inc(len(texts))
        keys = []
        pending = _Pending()
        for text in texts:
            norm = normalise_text(text)
            key = cache_key(self.model_id, input_type, norm)
            keys.append(key)
            pending.texts.setdefault(key, norm)
        found: dict[str, EmbeddedText] = {}
        result = EmbedResult(items=[])
        if not bypass_cache and self.l1 is not None:
            for key in list(pending.texts):
                hit = self.l1.get(key)
                if hit is not None:
                    found[key] = EmbeddedText(hit.vector, hit.token_count, hit.truncated, True)
                    del pending.texts[key]
            result.l1_hits = len(found)
            self._l1_hits.inc(result.l1_hits)
            self._l1_misses.inc(len(pending.texts))
        if pending.texts:
            await self._prepare(pending)
            if not bypass_cache and self.l2 is not None:
                await self._read_l2(pending, found, result)
        if pending.texts:
            computed, to_store = await self._compute(pending, result)
            found.update(computed)
            if self.l2 is not None and to_store:
                await self.l2.put_many([(k, computed[k].vector) for k in to_store])
        result.items = [found[key] for key in keys]
        return result

    async def _prepare(self, pending: _Pending) -> None:
        keys = list(pending.texts)
        texts = [pending.texts[k] for k in keys]
        if sum(map(len, texts)) > INLINE_PREPARE_CHARS:
            # HF tokenizers release the GIL in encode_batch, so the loop keeps serving while this runs.
            prepared = await asyncio.to_thread(self.backend.prepare, texts)
        else:
            prepared = self.backend.prepare(texts)
        for key, item in zip(keys, prepared):
            if item.truncated and not self.truncate:
                raise InvalidArgument(f"texts: a text is over the model's limit of {self.backend.input_limit} "
                                      f"({item.text[:40]!r}...); shorten it or enable truncation")
            pending.prepared[key] = item

    async def _read_l2(self, pending: _Pending, found: dict[str, EmbeddedText], result: EmbedResult) -> None:
        keys = list(pending.texts)
        vectors = await self.l2.get_many(keys)
        for key, vector in zip(keys, vectors):
            if vector is None:
                continue
            item = pending.prepared.pop(key)
            del pending.texts[key]
            cached = CachedVector(vector, item.token_count, item.truncated)
            if self.l1 is not None:
                self.l1.put(key, cached)  # promotion: the next hit on this replica skips Redis
            found[key] = EmbeddedText(vector, item.token_count, item.truncated, True)
            result.l2_hits += 1
        self._l2_hits.inc(result.l2_hits)
        self._l2_misses.inc(len(pending.texts))

    async def _compute(self, pending: _Pending,
                       result: EmbedResult) -> tuple[dict[str, EmbeddedText], list[str]]:
        """Join flights already running; queue the rest as one group (all admitted or Overloaded). Returns the
        vectors and the keys this request claimed for the L2 write."""
        keys = list(pending.texts)
        own = [k for k in keys if not self._joinable(k)]
        futures = self.batcher.append([pending.prepared[k] for k in own]) if own else []
        for key, future in zip(own, futures):
            flight = _Flight(future, pending.prepared[key])
            self._flights[key] = flight
            future.add_done_callback(lambda f, k=key, fl=flight: self._land(k, fl, f))
        flights = [self._flights[k] for k in keys]
        result.joined = len(keys) - len(own)
        result.computed = len(own)
        metrics.SINGLE_FLIGHT.inc(result.joined)
        for flight in flights:
            flight.waiters += 1
        gathered = asyncio.gather(*(f.future for f in flights))
        try:
            done: list[Embedded] = await asyncio.shield(gathered)
        except BaseException:
            # Retrieve the gather's outcome so a flight cancelled below is not logged as 'never retrieved'.
            gathered.add_done_callback(lambda g: g.cancelled() or g.exception())
            for key, flight in zip(keys, flights):
                flight.waiters -= 1
                if flight.waiters == 0 and not flight.future.done():
                    flight.future.cancel()  # nobody wants it any more: drop it from the queue
                    # Forget it now, not in _land a loop step later: a request arriving in between would join it.
                    if self._flights.get(key) is flight:
                        del self._flights[key]
            raise
        for flight in flights:
            flight.waiters -= 1
        out = {}
        to_store = []
        for key, flight, embedded in zip(keys, flights, done):
            result.max_batch_size = max(result.max_batch_size, embedded.batch_size)
            result.max_queue_wait = max(result.max_queue_wait, embedded.queue_wait)
            out[key] = EmbeddedText(embedded.vector, flight.prepared.token_count, flight.prepared.truncated, False)
            # The first waiter to resume writes, not the starter: if the starter was cancelled, a joiner still does.
            if not flight.stored:
                flight.stored = True
                to_store.append(key)
        metrics.TRUNCATED.inc(sum(1 for key in own if pending.prepared[key].truncated))
        return out, to_store

    def _joinable(self, key: str) -> bool:
        """A running flight, or one already finished with a vector. A cancelled or failed one stays in _flights
        until _land runs a loop step later; joining it would fail a request whose text was never tried."""
        flight = self._flights.get(key)
        if flight is None:
            return False
        future = flight.future
        return not future.done() or (not future.cancelled() and future.exception() is None)

    def _land(self, key: str, flight: _Flight, future: asyncio.Future) -> None:
        # Cache on completion even if the request that started the flight has gone: other waiters paid for it.
        if self._flights.get(key) is flight:
            del self._flights[key]
        if future.cancelled() or future.exception() is not None or self.l1 is None:
            return
        embedded: Embedded = future.result()
        # A compact copy: the batcher's vector is a row view of the whole batch matrix, which L1 (counting only
        # the row's bytes) would otherwise keep alive for as long as any one row stays cached.
        vector = embedded.vector.copy()
        self.l1.put(key, CachedVector(vector, flight.prepared.token_count, flight.prepared.truncated))

    async def prewarm(self, path: str | Path, input_type: int, *, chunk: int = 64) -> int:
        """Embed the non-empty lines of `path` into the cache before serving; returns how many."""
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        for start in range(0, len(lines), chunk):
            await self.embed(lines[start:start + chunk], input_type)
        log.info("cache pre-warmed", extra={"fields": {"file": str(path), "texts": len(lines)}})
        return len(lines)

    async def close(self) -> None:
        await self.batcher.close()
        if self.l2 is not None:
            await self.l2.close()
        await self.backend.close()
