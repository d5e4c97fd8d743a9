"""The client's deadline, split into per-stage budgets for the calls the gateway makes on its behalf.

    deadline = Deadline.from_context(context)      # None remaining = the client set no deadline
    await client.embed(..., timeout=deadline.budget(budgets.embed, "embed"))
"""

from __future__ import annotations

import time

import grpc

from services.runtime.errors import DeadlineExceeded

# Below this, a downstream call cannot finish anyway: fail now instead of starting it.
MIN_USEFUL_SECONDS = 0.005


class Deadline:
    def __init__(self, remaining: float | None) -> None:
        self._expires = None if remaining is None else time.monotonic() + remaining

    @classmethod
    def from_context(cls, context: grpc.aio.ServicerContext) -> "Deadline":
        return cls(context.time_remaining())

    def remaining(self) -> float | None:
        return None if self._expires is None else self._expires - time.monotonic()

    def budget(self, stage_budget: float, stage: str) -> float:
        """Timeout for one stage: its own budget, cut to what is left of the client's deadline."""
        remaining = self.remaining()
        if remaining is None:
            return stage_budget
        if remaining < MIN_USEFUL_SECONDS:
            raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")
        return min(stage_budget, remaining)
