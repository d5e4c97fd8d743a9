"""The generation service's coalescer: services.runtime.coalesce bound to the answerer's events (Delta, Done).

    async with Coalescer(answerer.stream(prompt), max_bytes=1024, max_delay=0.005, window=0.02) as events:
        async for event in events:       # Delta (possibly merged) ... then Done
            ...

``window`` 0 forwards each delta at once and merges only while the consumer lags; above 0, at most one message
leaves per window (the first delta, and any after a pause, at once). See services.runtime.coalesce.
"""

from __future__ import annotations

from typing import AsyncIterator

from services.generation import metrics
from services.generation.base import Delta, Event
from services.runtime import coalesce
from services.runtime.coalesce import DEFAULT_MAX_PENDING_BYTES

__all__ = ["Coalescer", "DEFAULT_MAX_PENDING_BYTES"]


def _text(event: Event) -> str | None:
    return event.text if isinstance(event, Delta) else None


class Coalescer(coalesce.Coalescer[Event]):
    def __init__(self, source: AsyncIterator[Event], *, max_bytes: int = 1024, max_delay: float = 0.005,
                 window: float = 0.0, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        super().__init__(source, text=_text, join=Delta, max_bytes=max_bytes, max_delay=max_delay, window=window,
                         max_pending_bytes=max_pending_bytes, on_merge=metrics.DELTAS_COALESCED.inc)
