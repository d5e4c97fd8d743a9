"""Dynamic micro-batching: merges the texts of concurrent requests into model batches grouped by length.

Policy (TEI's queue, adapted to a CPU model whose cost grows with padded tokens):
- Admission is bounded: `append` refuses at once with Overloaded when the queue would exceed its capacity.
- A batch is bounded by `max_batch_size` texts AND `max_batch_tokens` padded tokens (texts x longest text): on CPU a
  batch costs about its padded tokens, so a budget keeps long texts in small batches and short ones in big ones.
- Grouping by length: the batch grows from the oldest queued text towards the neighbours in token-count order that
  add the least padding, and stops when the next text would add more than `max_added_padding` padded tokens (a
  text's own padding, or the rise of every text already in the batch): on CPU, batching saves only a fixed per-run
  cost, so a 20-token sentence padded to a 256-token abstract makes the batch slower than running both alone.
  Backends that do not pad (`pads_batches` False, a remote API) skip this limit.
- Bounded overtaking (policy `bounded`, the default): only texts that arrived within the reorder window of the
  oldest one may join its batch, so a newer text never goes ahead of one that has waited longer than the window.
  The window is `reorder_window_ms` or `reorder_window_share` of the oldest text's wait, whichever is longer: the
  overtaking a text sees stays a fixed share of its own wait at any load. A fixed 100 ms held ~5 of 64 callers'
  texts when a wait was ~1.2 s, too few to group: mean batch 8.5 -> 2.7 against pure length grouping on the issue-5
  mix. With pure length grouping (policy `length`) any queued text could join, and a text of a rare length waited
  until everything older was served while newer texts of common lengths kept going ahead of it (p99 2.4-2.7x p50
  under 64 callers). A finished batch's callers come back within a few ms of each other, so the window still holds
  texts to group.
- Waiting: none while a full batch is queued; when the model is free and traffic is bursty (at least half of the
  last 16 requests arrived within `max_wait` of the previous one), it waits up to `max_wait` after the oldest arrival
  for more texts; with sparse traffic (a lone caller) it never waits, so batching adds no latency there. A backend
  that does not pad (remote) also waits, whatever the traffic, while another of its calls is in flight: otherwise
  each free slot takes a single text as it arrives.
- Per-text backends (`shares_call_cost` False: the int8 model runs each text alone, so merging saves nothing and a
  call costs just the sum of its texts) are served first come, first served over their call slots, never waiting:
  while a slot is free and a text is queued, a slot call starts with the oldest text, and when a text is done the
  call takes the next oldest one itself (`backend.embed_each`, on its model thread), up to `max_batch_size` texts,
  until the queue is empty; each caller gets its vector when its own text is done, not when the call ends (finished
  vectors go back to the event loop together while the queue is deep, held at most `_HOLD_SHARE` of their wait).
  Cutting batches up front (ceil(queued / free slots) texts) committed a burst to a slot that was busy with it for
  long: with 6 texts queued when one slot freed, all 6 went to that slot while the other found the queue empty,
  and a query behind a 256-token chunk got its answer only when the whole call ended (8 callers: p99 2.4x p50,
  against 1.7x for plain FIFO over 2 slots at the same texts' costs). Taking in the model thread, and handing finished
  vectors back in groups under load, keeps the hand-offs to the event loop few: one per text was slow under load
  (batch 1: 148 texts/s vs 188 at 64 callers; each hand-off wakes the loop and writes to gRPC on the cores the model
  uses). No text ever passes an older one here.
- Work happens in `batching_task`; up to `backend.max_in_flight` calls run at once (1 for the float32 model, one
  per core for the int8 model, a few HTTP calls for a remote endpoint).
- A text whose caller cancelled before its batch started is dropped; each caller's future resolves as soon as the
  batch holding its text is done (a per-text backend's: when its text is, as above).
- A batch the backend refuses as bad input (InvalidArgument, e.g. an endpoint's 400 for one over-long text) is
  split in halves and retried until the bad text is alone, so it fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from itertools import takewhile
from dataclasses import dataclass, field
from typing import Coroutine, Sequence

import numpy as np

from services.embedding import metrics
from services.embedding.backends.base import EmbeddingBackend, PreparedText
from services.embedding.config import BatcherConfig
from services.runtime.errors import InvalidArgument, Overloaded

log = logging.getLogger("ragfleet.embedding.batcher")

_BURST_WINDOW = 16
# A per-text backend's finished vectors are held back (and go to the event loop together) for at most this share of
# their latency so far: each hand-off costs a loop wake-up and a gRPC write on both ends, on the cores the model
# uses. One per text cost 6 % of the texts/s at 64 callers (206 vs 219 on phase 2's mix, same run), held: 1.4 %.
_HOLD_SHARE = 0.1
# ...and only while this many texts wait: a shallow queue can run dry while answers are held, and a closed-loop
# caller holding an answer sends no next text (8 callers: at most 6 wait; 64 callers: ~60).
_HOLD_MIN_QUEUED = 16


@dataclass(frozen=True, slots=True)
class Embedded:
    """One text's vector plus what the caller's span reports."""

    vector: np.ndarray
    batch_size: int
    queue_wait: float


@dataclass(slots=True, eq=False)
class _Entry:
    item: PreparedText
    future: asyncio.Future
    enqueued: float
    queued: bool = field(default=True)
    started: float = 0.0


class Batcher:
    def __init__(self, backend: EmbeddingBackend, config: BatcherConfig) -> None:
        self.backend = backend
        self.config = config
        self.max_batch_size = max(1, min(config.max_batch_size, backend.max_batch_size))
        self._max_wait = config.max_wait_ms / 1000.0
        self._max_added_padding = config.max_added_padding if backend.pads_batches else float("inf")
        self._per_text = not backend.shares_call_cost
        bounded = config.policy == "bounded"
        self._reorder_window = config.reorder_window_ms / 1000.0 if bounded else float("inf")
        self._reorder_share = config.reorder_window_share if bounded else 0.0
        self._queue: list[_Entry] = []
        self._live = 0  # queued texts whose callers are still waiting
        # Guards _queue, _live and each entry's `queued`: a per-text backend's model threads take texts themselves.
        self._lock = threading.Lock()
        # Model seconds per token of a per-text backend (a running mean): the next text's expected run.
        self._seconds_per_token = 0.0
        self._wakeup = asyncio.Event()
        self._in_flight = 0
        self._running: set[asyncio.Task] = set()
        self._last_arrival: float | None = None
        # Whether each of the last arrivals came within max_wait of the one before: the burstiness signal.
        self._close_arrivals: deque[bool] = deque(maxlen=_BURST_WINDOW)
        self._task: asyncio.Task | None = None
        metrics.OLDEST_AGE.set_function(self.oldest_age)

    @property
    def depth(self) -> int:
        return self._live

    def oldest_age(self) -> float:
        """Seconds the oldest queued text has waited (0 when none): read by the metrics thread at scrape time."""
        for entry in tuple(self._queue):
            if entry.queued:
                return max(0.0, time.perf_counter() - entry.enqueued)
        return 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.batching_task(), name="embedding-batching-task")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with self._lock:
            queued, self._queue = self._queue, []
        for entry in queued:
            if not entry.future.done():
                entry.future.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # -- admission ------------------------------------------------------------------------------------------------

    def append(self, items: Sequence[PreparedText]) -> list[asyncio.Future]:
        """Queue texts; one future per text resolving to an Embedded. All or nothing: Overloaded if they don't fit."""
        if self._live + len(items) > self.config.queue_capacity:
            metrics.OVERLOADED.inc()
            raise Overloaded(f"embedding queue is full ({self._live} of {self.config.queue_capacity} texts "
                             f"waiting); retry later")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if self._last_arrival is not None:
            self._close_arrivals.append(now - self._last_arrival < self._max_wait)
        self._last_arrival = now
        entries = [_Entry(item, loop.create_future(), now) for item in items]
        for entry in entries:
            entry.future.add_done_callback(lambda _f, e=entry: self._forget(e))
        with self._lock:
            self._queue.extend(entries)
            self._live += len(entries)
            metrics.QUEUE_DEPTH.set(self._live)
        self._wakeup.set()
        return [entry.future for entry in entries]

    def _forget(self, entry: _Entry) -> None:
        # A caller cancelled while its text was still queued: free its slot now; the batcher skips the entry.
        with self._lock:
            self._unqueue(entry)

    def _unqueue(self, entry: _Entry) -> None:
        """Count a queued entry out (caller holds the lock)."""
        if entry.queued:
            entry.queued = False
            self._live -= 1
            metrics.QUEUE_DEPTH.set(self._live)

    def _take(self) -> _Entry | None:
        """The oldest text still wanted, off the queue: thread-safe, for per-text backends' model threads."""
        with self._lock:
            while self._queue:
                entry = self._queue.pop(0)
                if entry.queued and not entry.future.done():
                    self._unqueue(entry)
                    return entry
                self._unqueue(entry)  # cancelled, its done-callback not run yet: never computed
        return None

    # -- batching -------------------------------------------------------------------------------------------------

    async def batching_task(self) -> None:
        while True:
            if not self._live or self._in_flight >= self.backend.max_in_flight:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._per_text:
                first = self._take()
                if first is not None:
                    self._launch(self._run_each(first))
                continue
            if self._should_wait():
                await self._wait_for_more()
            batch = self.next_batch()
            if not batch:
                continue
            self._launch(self._run(batch))
            # Let callers that are ready right now append before the next batch is cut.
            await asyncio.sleep(0)

    def _launch(self, call: Coroutine[None, None, None]) -> None:
        self._in_flight += 1
        task = asyncio.create_task(call)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _should_wait(self) -> bool:
        if self._max_wait <= 0 or self.max_batch_size <= 1 or self._full_batch_queued():
            return False
        if not self.backend.pads_batches and self._in_flight > 0:
            # A remote call is already running, so this one is not the caller's only way forward: a slot filled
            # with one or two texts costs a whole HTTP call (the endpoint's per-call cost and our ~3 ms of CPU),
            # and with several calls allowed in flight every free slot took a single text as it arrived.
            return True
        # Wait only if at least half of the recent arrivals came in bursts: then more texts are likely on their
        # way; a lone caller's arrivals are far apart and it never pays the wait.
        return 2 * sum(self._close_arrivals) >= max(len(self._close_arrivals), 2)

    def _full_batch_queued(self) -> bool:
        return self._live >= self.max_batch_size

    async def _wait_for_more(self) -> None:
        oldest = next(e.enqueued for e in self._queue if e.queued)
        deadline = oldest + self._max_wait
        while not self._full_batch_queued():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def next_batch(self) -> list[_Entry]:
        """Cut one batch of at most max_batch_size texts: start at the oldest text, grow in
        token-count order by least added padding."""
        with self._lock:
            return self._cut()

    def _cut(self) -> list[_Entry]:
        for entry in self._queue:
            if entry.queued and entry.future.done():
                # Cancelled in this loop turn, before its done-callback ran: never batch it, free its slot now.
                self._unqueue(entry)
        live = [e for e in self._queue if e.queued]
        self._queue = live
        if not live:
            return []
        anchor = live[0]
        horizon = anchor.enqueued + max(self._reorder_window,
                                        self._reorder_share * (time.perf_counter() - anchor.enqueued))
        # The queue is in arrival order: the candidates are its prefix that arrived within the window.
        candidates = live if horizon == float("inf") else list(takewhile(lambda e: e.enqueued <= horizon, live))
        ordered = sorted(candidates, key=lambda e: e.item.token_count)
        lo = hi = ordered.index(anchor)
        longest = anchor.item.token_count
        budget = self.config.max_batch_tokens
        max_waste = self._max_added_padding
        size, most = 1, self.max_batch_size
        while size < most:
            best, best_waste = None, None
            if lo > 0:
                shorter = ordered[lo - 1].item.token_count
                waste = longest - shorter
                if (size + 1) * longest <= budget and waste <= max_waste:
                    best, best_waste = "lo", waste
            if hi + 1 < len(ordered):
                longer = ordered[hi + 1].item.token_count
                waste = size * (longer - longest)
                if (size + 1) * longer <= budget and waste <= max_waste and (best_waste is None or waste < best_waste):
                    best, best_waste = "hi", waste
            if best is None:
                break
            if best == "lo":
                lo -= 1
            else:
                hi += 1
                longest = ordered[hi].item.token_count
            size += 1
        batch = ordered[lo:hi + 1]
        for entry in batch:
            entry.queued = False
        self._live -= len(batch)
        chosen = set(map(id, batch))
        self._queue = [e for e in live if id(e) not in chosen]
        metrics.QUEUE_DEPTH.set(self._live)
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        started = time.perf_counter()
        longest = max(e.item.token_count for e in batch)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.BATCH_TOKENS.observe(len(batch) * longest)
        for entry in batch:
            metrics.QUEUE_WAIT.observe(started - entry.enqueued)
        try:
            await self._embed(batch, started)
        finally:
            metrics.MODEL_TIME.observe(time.perf_counter() - started)
            self._in_flight -= 1
            self._wakeup.set()

    async def _run_each(self, first: _Entry) -> None:
        """One call of a per-text backend: `first`, then the oldest queued text each time one is done (taken on
        the model thread), up to max_batch_size texts or until the queue is empty. Finished vectors go back to the
        event loop together, as soon as holding them longer would stretch one text's latency by more than
        _HOLD_SHARE (counting the next text's expected run), fewer than _HOLD_MIN_QUEUED texts wait, or the call
        ends. Metrics count the call as one batch of the texts it ran."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        upcoming = [first]
        running: deque[_Entry] = deque()  # taken, their results not put yet (put comes in the order taken)
        ran: list[_Entry] = []
        held: list[tuple[_Entry, np.ndarray | Exception]] = []
        hold_until = float("inf")

        def flush() -> None:
            nonlocal hold_until
            if held:
                loop.call_soon_threadsafe(self._deliver_all, held.copy())
                held.clear()
                hold_until = float("inf")

        def take() -> PreparedText | None:
            if upcoming:
                entry: _Entry | None = upcoming.pop()
            else:
                entry = self._take() if len(ran) < self.max_batch_size else None
                if entry is None:
                    flush()
                    return None
                expected = self._seconds_per_token * entry.item.token_count
                if self._live < _HOLD_MIN_QUEUED or time.perf_counter() + expected > hold_until:
                    flush()
            assert entry is not None
            entry.started = time.perf_counter()
            metrics.QUEUE_WAIT.observe(entry.started - entry.enqueued)
            ran.append(entry)
            running.append(entry)
            return entry.item

        def put(result: np.ndarray | Exception) -> None:
            nonlocal hold_until
            entry = running.popleft()
            now = time.perf_counter()
            run = now - entry.started
            self._seconds_per_token += 0.2 * (run / max(1, entry.item.token_count) - self._seconds_per_token)
            held.append((entry, result))
            hold_until = min(hold_until, now + _HOLD_SHARE * (now - entry.enqueued))

        try:
            await self.backend.embed_each(take, put)
        except Exception as exc:  # noqa: BLE001 - the texts taken and not answered get the failure
            log.warning("embedding call failed: %s", exc)
            self._fail(list(running), exc)
        finally:
            self._deliver_all(held)  # what a failed or cancelled call still held (its thread is done with it)
            metrics.MODEL_TIME.observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.observe(len(ran))
            metrics.BATCH_TOKENS.observe(sum(e.item.token_count for e in ran))  # nothing padded: each runs alone
            self._in_flight -= 1
            self._wakeup.set()

    @staticmethod
    def _deliver_all(results: list[tuple[_Entry, np.ndarray | Exception]]) -> None:
        """On the event loop: each text's outcome to its caller (the model ran it alone: batch size 1)."""
        for entry, result in results:
            if entry.future.done():
                continue
            if isinstance(result, Exception):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(Embedded(result, 1, entry.started - entry.enqueued))

    async def _embed(self, batch: list[_Entry], started: float) -> None:
        """One backend call whose outcome goes to every caller in `batch`, except a refusal of a batch of several:
        its halves are retried one after the other (staying within max_in_flight), so one bad text costs its
        neighbours about two calls per halving, not their answers."""
        try:
            vectors = await self.backend.embed([e.item for e in batch])
        except InvalidArgument as exc:
            live = [e for e in batch if not e.future.done()]
            if len(batch) == 1 or not live:
                self._fail(batch, exc)
                return
            log.info("embedding batch of %d texts refused (%s); retrying its halves", len(live), exc)
            half = (len(live) + 1) // 2
            await self._embed(live[:half], started)
            await self._embed(live[half:], started)
        except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the failure
            log.warning("embedding batch failed: %s", exc)
            self._fail(batch, exc)
        else:
            for entry, vector in zip(batch, vectors):
                if not entry.future.done():
                    entry.future.set_result(Embedded(vector, len(batch), started - entry.enqueued))

    @staticmethod
    def _fail(batch: list[_Entry], exc: Exception) -> None:
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)
