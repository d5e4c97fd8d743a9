"""Admission control: at most ``limit`` calls in flight, refused at once beyond that (no unbounded queue).

Like TEI's ``try_acquire_permit``: a caller over the limit gets RESOURCE_EXHAUSTED (Overloaded) now, not a slow answer
later, and retries with backoff or goes to another replica. Each service passes its own gauge and counter (module
level, so each exists once per process) and names the setting that raises the limit.

    limiter = AdmissionLimiter(512, in_flight=ASKS_IN_FLIGHT, rejected=ASKS_REJECTED,
                               what="gateway: {} Asks", setting="RAGFLEET_GATEWAY_MAX_IN_FLIGHT")
    with limiter.admitted():  # in an async generator too: the slot is freed when it closes
        ...
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Counter, Gauge

from services.runtime.errors import Overloaded


class AdmissionLimiter:
    def __init__(self, limit: int, *, in_flight: Gauge, rejected: Counter, what: str, setting: str) -> None:
        """``what`` names the calls for the refusal, ``{}`` standing for how many are in flight."""
        self.limit = limit
        self.count = 0
        self._in_flight = in_flight
        self._rejected = rejected
        self._what = what
        self._setting = setting

    def acquire(self) -> None:
        """Take a slot or raise Overloaded. Single-threaded asyncio: no lock needed between check and increment."""
        if self.count >= self.limit:
            self._rejected.inc()
            raise Overloaded(f"{self._what.format(self.count)} in flight, the limit is {self.limit} "
                             f"({self._setting}); retry with backoff")
        self.count += 1
        self._in_flight.inc()

    def release(self) -> None:
        self.count -= 1
        self._in_flight.dec()

    @contextmanager
    def admitted(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
