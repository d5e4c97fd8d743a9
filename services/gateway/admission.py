"""Admission control: at most N Asks in flight per replica, refused at once beyond that (no unbounded queue)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.runtime.errors import Overloaded

ASKS_IN_FLIGHT = Gauge("ragfleet_gateway_asks_in_flight", "Ask streams in progress on this replica")
ASKS_REJECTED = Counter("ragfleet_gateway_asks_rejected_total", "Asks refused with RESOURCE_EXHAUSTED")


class InFlightLimiter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def acquire(self) -> None:
        """Take a slot or raise Overloaded. Single-threaded asyncio: no lock needed between check and increment."""
        if self.count >= self.limit:
            ASKS_REJECTED.inc()
            raise Overloaded(f"gateway: {self.count} Asks in flight, the limit is {self.limit} "
                             "(RAGFLEET_GATEWAY_MAX_IN_FLIGHT); retry with backoff")
        self.count += 1
        ASKS_IN_FLIGHT.set(self.count)

    def release(self) -> None:
        self.count -= 1
        ASKS_IN_FLIGHT.set(self.count)
