"""Stream coalescing: forward each delta at once; merge pending deltas only while the consumer lags.

A pump task reads the answerer into a bounded buffer while the gRPC handler writes to the client. When the handler
comes back for more and finds a single delta (or has to wait for one), that delta goes out alone and at once: a
consumer that keeps up sees every delta as produced, and the first token is never held. When it finds a backlog,
the consumer lags (slow client, flow control): the pending deltas go out as one message, at most ``max_bytes``,
and while lagging a merge may wait for more deltas until its oldest one is ``max_delay`` old. A full buffer
(``max_pending_bytes``) stops the pump, so backpressure reaches the LLM's HTTP stream instead of growing memory.

    async with Coalescer(answerer.stream(prompt), max_bytes=1024, max_delay=0.005) as events:
        async for event in events:       # Delta (possibly merged) ... then Done
            ...

Leaving the block (normally, on error or on cancellation) cancels the pump and closes the source stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator

from services.generation import metrics
from services.generation.base import Delta, Event

DEFAULT_MAX_PENDING_BYTES = 256 * 1024


class Coalescer:
    def __init__(self, source: AsyncIterator[Event], *, max_bytes: int = 1024, max_delay: float = 0.005,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        self._source = source
        self._max_bytes = max_bytes
        self._max_delay = max_delay
        self._max_pending = max_pending_bytes
        self._queue: deque[tuple[Event, float, int]] = deque()  # (event, arrival time, utf-8 size)
        self._pending_bytes = 0
        self._changed = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._done = False
        self._error: BaseException | None = None
        self._lagging = False
        self._pump: asyncio.Task[None] | None = None
        self.messages = 0
        self.merged = 0  # deltas that travelled inside an earlier delta's message

    async def __aenter__(self) -> "Coalescer":
        self._pump = asyncio.create_task(self._pump_task(), name="coalesce-pump")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
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
                size = len(event.text.encode()) if isinstance(event, Delta) else 0
                self._queue.append((event, loop.time(), size))
                self._pending_bytes += size
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer after the deltas before it
            self._error = exc
        finally:
            self._done = True
            self._changed.set()
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()

    def __aiter__(self) -> "Coalescer":
        return self

    async def _wait_change(self, timeout: float | None = None) -> None:
        self._changed.clear()
        if timeout is None:
            await self._changed.wait()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def __anext__(self) -> Event:
        if not self._queue:
            self._lagging = False  # the consumer is waiting for the producer: it keeps up
            while not self._queue:
                if self._done:
                    if self._error is not None:
                        error, self._error = self._error, None
                        raise error
                    raise StopAsyncIteration
                await self._wait_change()
        head = self._queue[0][0]
        if not isinstance(head, Delta) or (not self._lagging and len(self._queue) == 1):
            return self._pop()
        if self._lagging:
            await self._linger()
        self._lagging = True
        return self._merge()

    async def _linger(self) -> None:
        """While lagging, let a merge fill up to max_bytes, but never hold its oldest delta past max_delay."""
        loop = asyncio.get_running_loop()
        deadline = self._queue[0][1] + self._max_delay
        while not self._done and self._fill() < self._max_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await self._wait_change(remaining)

    def _fill(self) -> int:
        """Bytes of the deltas at the head of the queue that one merge could take."""
        total = 0
        for event, _, size in self._queue:
            if not isinstance(event, Delta):
                return self._max_bytes  # a Done ends the merge: nothing more can join it
            total += size
        return total

    def _pop(self) -> Event:
        event, _, size = self._queue.popleft()
        self._taken(size)
        self.messages += 1
        return event

    def _merge(self) -> Delta:
        parts: list[str] = []
        total = 0
        while self._queue:
            event, _, size = self._queue[0]
            if not isinstance(event, Delta) or (parts and total + size > self._max_bytes):
                break
            self._queue.popleft()
            parts.append(event.text)
            total += size
        self._taken(total)
        self.messages += 1
        if len(parts) > 1:
            self.merged += len(parts) - 1
            metrics.DELTAS_COALESCED.inc(len(parts) - 1)
        return Delta("".join(parts))

    def _taken(self, size: int) -> None:
        self._pending_bytes -= size
        if self._pending_bytes < self._max_pending:
            self._space.set()
