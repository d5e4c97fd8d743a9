"""Stream coalescing for every hop that relays text deltas (generation -> gateway -> client): fewer, fuller messages.

A pump task reads the source into a bounded buffer while the consumer (a gRPC handler) writes. Two modes:

- ``window == 0`` (lag mode): each delta goes out alone and at once to a consumer that keeps up; only when the
  consumer comes back to a backlog (slow client, flow control) do the pending deltas leave as one message, and while
  lagging a merge may wait for more until its oldest delta is ``max_delay`` old.
- ``window > 0`` (time-window mode, for fast LLMs): about one message per ``window``. A delta that finds the last
  message at least ``window`` old goes out at once, so the first token is never held, nor a token after a pause; one
  that arrives sooner is held until ``window`` after the last message, and every delta arriving meanwhile joins it.
  A held delta arrived after the last message left, so none waits more than ``window``; a source that already
  spaces its messages ``window`` apart (an upstream coalescer) passes through unheld. The event loop wakes a timer
  late (epoll rounds a timeout up to the next millisecond, and other callbacks may be running), so a hold aims
  that lateness early: ``TimerLateness`` estimates it as TCP estimates a retransmission timeout (RFC 6298: the mean
  plus a multiple of the mean deviation), capped at a quarter of the window. The window bounds the added delay
  including the loop's own lateness, at the price of messages a little under a window apart.
  A hold is worth it only when deltas come at least two a window: a stream whose deltas arrive (smoothed) more than
  half a window apart sends each as it comes. A hold there would delay every delta to merge few of them (at 60
  tokens/s and a 20 ms window, 0.92 messages per token), and the timer that ends it wakes the process once more a
  message: generation spent twice the CPU per token with it (bench/coalescing.py).

In both modes a non-delta event (the final message) or the source's error flushes what is held at once, ``max_bytes``
bounds a merge (a single bigger delta still goes out whole), and a full buffer (``max_pending_bytes``) stops the
pump, so backpressure reaches the source instead of growing memory.

    relay = Coalescer(events, text=lambda e: e.text if isinstance(e, Delta) else None, join=Delta, window=0.02)
    async with relay:                        # or contextlib.aclosing(relay): the pump starts on the first read
        async for event in relay:            # deltas (some merged) ... then the final event
            ...

Leaving the block (normally, on error or on cancellation) cancels the pump and closes the source stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Callable, Generic, TypeVar

E = TypeVar("E")

DEFAULT_MAX_BYTES = 1024
DEFAULT_MAX_DELAY = 0.005
DEFAULT_MAX_PENDING_BYTES = 256 * 1024
GAP_GAIN = 0.25  # weight of the newest gap between deltas in their smoothed time apart (window mode)


class TimerLateness:
    """How late this process's event loop wakes a timed wait, smoothed over every coalescer's holds (they share
    one loop): ``allowance()`` is how early a hold should aim to end by its deadline most of the time."""

    GAIN = 0.125  # RFC 6298's alpha, for the mean
    DEVIATION_GAIN = 0.25  # RFC 6298's beta, for the mean deviation
    DEVIATIONS = 4  # RFC 6298's K: the allowance covers the mean plus K mean deviations

    def __init__(self, initial: float = 0.0005) -> None:
        self.mean = initial  # half of epoll's 1 ms rounding before anything is measured
        self.deviation = initial / 2

    def observe(self, late: float) -> None:
        late = max(0.0, late)
        self.deviation += self.DEVIATION_GAIN * (abs(late - self.mean) - self.deviation)
        self.mean += self.GAIN * (late - self.mean)

    def allowance(self, cap: float) -> float:
        return min(cap, self.mean + self.DEVIATIONS * self.deviation)


class Coalescer(Generic[E]):
    def __init__(self, source: AsyncIterator[E], *, text: Callable[[E], str | None], join: Callable[[str], E],
                 max_bytes: int = DEFAULT_MAX_BYTES, max_delay: float = DEFAULT_MAX_DELAY, window: float = 0.0,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
                 on_merge: Callable[[int], None] | None = None) -> None:
        """``text(event)`` is a delta's text, or None for an event that must not be merged; ``join(text)`` builds
        the merged delta; ``on_merge(n)`` is told of every n deltas that travelled inside an earlier one's message."""
        self._source = source
        self._text = text
        self._join = join
        self._max_bytes = max_bytes
        self._max_delay = max_delay
        self._window = window
        self._max_pending = max_pending_bytes
        self._on_merge = on_merge
        # (event, its text or None, arrival time, utf-8 size)
        self._queue: deque[tuple[E, str | None, float, int]] = deque()
        self._pending_bytes = 0
        self._changed = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._done = False
        self._error: BaseException | None = None
        self._lagging = False
        self._lingering = False  # the consumer waits for a full merge, a final event or the end, not any delta
        self._last_sent = float("-inf")  # window mode: when the last message left
        self._last_arrival: float | None = None  # window mode: when the last delta arrived
        self._gap: float | None = None  # window mode: smoothed time between deltas
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._lateness = _LATENESS
        self.messages = 0
        self.merged = 0  # deltas that travelled inside an earlier delta's message

    async def __aenter__(self) -> "Coalescer[E]":
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        if self._pump is None and not self._closed:
            self._pump = asyncio.create_task(self._pump_task(), name="coalesce-pump")

    async def aclose(self) -> None:
        pump, self._pump = self._pump, None
        first_close, self._closed = not self._closed, True
        if pump is None:
            if first_close:  # never read: the pump that would close the source never ran
                await _close(self._source)
            return
        if not pump.done():
            pump.cancel()
            # asyncio.wait never raises the pump's CancelledError, so a cancellation of *this* task still propagates.
            await asyncio.wait([pump])

    async def _pump_task(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for event in self._source:
                while self._pending_bytes >= self._max_pending:
                    self._space.clear()
                    await self._space.wait()
                text = self._text(event)
                size = 0 if text is None else len(text.encode())
                now = loop.time()
                if text is not None and self._window > 0:
                    self._arrived(now)
                self._queue.append((event, text, now, size))
                self._pending_bytes += size
                # A lingering consumer needs no wake-up per delta, only when the merge is full or a final event
                # came: a burst of N deltas (the offline answerer's words) woke it N times, each with a timer.
                if not self._lingering or text is None or self._pending_bytes >= self._max_bytes:
                    self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer after the deltas before it
            self._error = exc
        finally:
            self._done = True
            self._changed.set()
            await _close(self._source)

    def _arrived(self, now: float) -> None:
        """Smooth the time between deltas (the first gap as it is, then an exponential average)."""
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap = gap if self._gap is None else self._gap + GAP_GAIN * (gap - self._gap)
        self._last_arrival = now

    def __aiter__(self) -> "Coalescer[E]":
        return self

    async def _wait_change(self, timeout: float | None = None) -> None:
        """Until the pump signals a change, or ``timeout`` seconds. The timeout is a timer that sets the same event,
        not asyncio.timeout: that cancels the task and raises twice (CancelledError, then TimeoutError) each time a
        hold runs out, which in window mode is about every message."""
        self._changed.clear()
        if timeout is None:
            await self._changed.wait()
            return
        timer = asyncio.get_running_loop().call_later(timeout, self._changed.set)
        try:
            await self._changed.wait()
        finally:
            timer.cancel()

    async def __anext__(self) -> E:
        self._start()
        if not self._queue:
            self._lagging = False  # the consumer is waiting for the producer: it keeps up
            while not self._queue:
                if self._done:
                    if self._error is not None:
                        error, self._error = self._error, None
                        raise error
                    raise StopAsyncIteration
                await self._wait_change()
        if self._queue[0][1] is None:
            return self._pop()
        if self._window > 0:
            # About one message per window: hold until window after the last one (at once if that has passed),
            # aiming the loop's usual lateness early so that no delta waits longer than the window; not when
            # deltas come less than two a window (what is queued leaves now: a burst still leaves as one).
            if self._gap is None or self._gap <= self._window / 2:
                early = self._lateness.allowance(self._window / 4)
                await self._linger(self._last_sent + self._window - early)
            event = self._merge()
            self._last_sent = asyncio.get_running_loop().time()
            return event
        if not self._lagging and len(self._queue) == 1:
            return self._pop()
        if self._lagging:
            await self._linger(self._queue[0][2] + self._max_delay)
        self._lagging = True
        return self._merge()

    async def _linger(self, deadline: float) -> None:
        """Let a merge fill up until the deadline (loop time), max_bytes, a non-delta event or the source's end. A
        wait that ran out its deadline tells TimerLateness how late the loop woke it."""
        loop = asyncio.get_running_loop()
        self._lingering = True
        waited = False
        try:
            while not self._done and self._fill() < self._max_bytes:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if waited:
                        self._lateness.observe(-remaining)
                    return
                waited = True
                await self._wait_change(remaining)
        finally:
            self._lingering = False

    def _fill(self) -> int:
        """Bytes of the deltas at the head of the queue that one merge could take."""
        total = 0
        for _, text, _, size in self._queue:
            if text is None:
                return self._max_bytes  # a final event ends the merge: nothing more can join it
            total += size
        return total

    def _pop(self) -> E:
        event, _, _, size = self._queue.popleft()
        self._taken(size)
        self.messages += 1
        return event

    def _merge(self) -> E:
        first, parts, total = self._queue[0][0], [], 0
        while self._queue:
            _, text, _, size = self._queue[0]
            if text is None or (parts and total + size > self._max_bytes):
                break
            self._queue.popleft()
            parts.append(text)
            total += size
        self._taken(total)
        self.messages += 1
        if len(parts) == 1:
            return first  # forwarded as it came: no new message built
        self.merged += len(parts) - 1
        if self._on_merge is not None:
            self._on_merge(len(parts) - 1)
        return self._join("".join(parts))

    def _taken(self, size: int) -> None:
        self._pending_bytes -= size
        if self._pending_bytes < self._max_pending:
            self._space.set()


_LATENESS = TimerLateness()  # one event loop per process: its timers' lateness is the same for every stream


async def _close(source: AsyncIterator[object]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()
