"""The retry policy: which errors retry, capped jittered backoff, the server's Retry-After, attempts and deadline."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from services.runtime.retry import RetryPolicy, is_transient, retry_after

_REQUEST = httpx2.Request("POST", "http://llm.test/v1/chat/completions")


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers or {}, request=_REQUEST)
    return openai.APIStatusError(f"HTTP {status}", response=response, body=None)


@pytest.mark.parametrize(("error", "transient"), [
    (TimeoutError(), True),
    (openai.APIConnectionError(request=_REQUEST), True),
    (openai.APITimeoutError(request=_REQUEST), True),
    (status_error(408), True), (status_error(409), True), (status_error(429), True),
    (status_error(500), True), (status_error(503), True),
    (status_error(400), False), (status_error(401), False), (status_error(404), False),
    (ValueError("bad JSON"), False),
])
def test_which_errors_retry(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_backoff_doubles_is_capped_and_jittered_but_never_near_zero() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    for retry, step in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (12, 1.0)):
        samples = [policy.backoff(retry) for _ in range(200)]
        assert all(step / 2 <= s < step for s in samples)
        assert len(set(samples)) > 100


def test_attempts_are_bounded_and_permanent_errors_never_retry() -> None:
    policy = RetryPolicy(max_retries=2)
    assert policy.delay(status_error(500), 1) is not None
    assert policy.delay(status_error(500), 2) is not None
    assert policy.delay(status_error(500), 3) is None  # one call + two retries
    assert policy.delay(status_error(400), 1) is None
    assert RetryPolicy(max_retries=0).delay(status_error(500), 1) is None


def test_retry_after_is_honoured_up_to_the_servers_limit() -> None:
    assert retry_after(status_error(429, {"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert retry_after(status_error(429, {"retry-after": "2"})) == 2.0
    assert retry_after(status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert retry_after(TimeoutError()) is None
    policy = RetryPolicy(max_retries=3, base_delay=0.01, max_server_wait=1.0)
    assert policy.delay(status_error(429, {"retry-after": "0.5"}), 1) == 0.5  # no sooner than asked
    assert policy.delay(status_error(429, {"retry-after": "30"}), 1) is None  # longer than worth waiting


async def test_a_wait_ending_past_the_deadline_gives_up() -> None:
    now = asyncio.get_running_loop().time()
    policy = RetryPolicy(max_retries=3, base_delay=0.2)
    assert policy.delay(status_error(503), 1, deadline=now + 0.05) is None
    delay = policy.delay(status_error(503), 1, deadline=now + 10)
    assert delay is not None and 0.1 <= delay < 0.2
