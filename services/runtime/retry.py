"""The one retry policy for calls to OpenAI-compatible endpoints (embedding's remote backend, generation's LLM).

Shaped like openai-python's ``_should_retry`` and ``_calculate_retry_timeout``: which errors may succeed on another
attempt, capped exponential backoff with jitter, the server's own ``Retry-After``, and the caller's deadline. The
caller keeps its loop (what an attempt is, and what to clean up between attempts); the policy only answers "wait
how long, or give up?".

    policy = RetryPolicy(max_retries=2, base_delay=0.1)
    for attempt in itertools.count(1):
        try:
            return await call()
        except Exception as exc:
            delay = policy.delay(exc, attempt, deadline=deadline)
            if delay is None:
                raise
            await asyncio.sleep(delay)
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx2
import openai

RETRYABLE_STATUS = frozenset({408, 409, 429})
DEFAULT_BASE_DELAY = 0.05
DEFAULT_MAX_DELAY = 1.0


def is_transient(error: BaseException) -> bool:
    """Connection problems, timeouts, 408/409/429 and 5xx may succeed on another attempt; other 4xx will not."""
    if isinstance(error, (TimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS or error.status_code >= 500
    return isinstance(error, (openai.APIError, httpx2.TransportError))


def retry_after(error: BaseException) -> float | None:
    """The wait a 429/503 asks for (``retry-after-ms``, else ``Retry-After`` in seconds), as the SDK reads it."""
    if not isinstance(error, openai.APIStatusError):
        return None
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            value = float(headers.get(name, ""))
        except ValueError:  # absent, or an HTTP date: fall back to our own backoff
            continue
        if value >= 0:
            return value * scale
    return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """At most ``max_retries`` retries; retry n waits ``base_delay * 2**(n-1)`` capped at ``max_delay``, times a
    jitter in [0.5, 1): spread out, yet never ~0, so a retry always gives the endpoint a moment. A server asking
    (Retry-After) for more than ``max_server_wait`` is not waited for: giving up answers sooner."""

    max_retries: int = 2
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    max_server_wait: float | None = None

    def backoff(self, retry: int) -> float:
        """The jittered wait before retry ``retry`` (1 = the first retry)."""
        return min(self.base_delay * 2 ** (retry - 1), self.max_delay) * (0.5 + random.random() / 2)

    def delay(self, error: BaseException, attempts: int, *, deadline: float | None = None) -> float | None:
        """The wait before the next attempt after ``attempts`` failed ones, the last with ``error``; None to give
        up: the error is not transient, the retries are spent, the server asks too much, or the wait would end at
        or past ``deadline`` (event-loop time)."""
        if not is_transient(error) or attempts > self.max_retries:
            return None
        wait = self.backoff(attempts)
        asked = retry_after(error)
        if asked is not None:
            if self.max_server_wait is not None and asked > self.max_server_wait:
                return None
            # Retrying sooner than a rate-limited server asks only prolongs the limit.
            wait = max(wait, asked)
        if deadline is not None and asyncio.get_running_loop().time() + wait >= deadline:
            return None
        return wait
