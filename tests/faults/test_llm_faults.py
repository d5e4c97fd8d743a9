"""The LLM slow, hung, rate limited (429 + Retry-After), failing (500), malformed or reset: each Ask ends with the
documented status (README, services/generation/servicer.py) or, with RAGFLEET_GENERATION_FALLBACK=true and before
the first token, the extractive answer — within its deadline, leaving no LLM connection, Generate stream or Ask
behind.

Documented: a failure before the first token -> UNAVAILABLE naming the LLM, or the fallback answer; a failure after
text was sent -> the deltas, then UNAVAILABLE (never retried, never replaced); the client's deadline ->
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import pytest

from tests.faults._mesh import MAX_RETRIES, FaultMesh
from tests.faults._scenarios import LLM_FAULTS, llm_fault


@pytest.mark.parametrize("name", list(LLM_FAULTS))
async def test_llm_fault_ends_as_documented_without_leaks(fm: FaultMesh, name: str) -> None:
    result = await llm_fault(fm, name, concurrency=3, rounds=2)
    assert result["sim_streams_left_open"] == 0, result
    for variant in ("no_fallback", "fallback"):
        if variant not in result:
            continue
        r = result[variant]
        assert r["as_documented"] == r["asks"], (variant, r)
        assert r["over_deadline"] == 0, (variant, r)
        assert r["leaked_connections"] == 0, (variant, r)
        assert r["generate_streams_left"] == 0 and r["asks_left_in_flight"] == 0, (variant, r)
        if r["expected"]["status"] == "UNAVAILABLE":
            assert all("LLM" in d or "generation" in d for d in r["details"]), r["details"]
    if name == "rate_limited_429":  # Retry-After 0.5 s: the one retry waits that long
        assert result["llm_requests_per_ask"] == 1 + MAX_RETRIES, result
        assert result["no_fallback"]["min_elapsed_s"] >= 0.5, result
    if name == "rate_limited_429_long_retry_after":  # past the first-token budget: no retry, no wait
        assert result["llm_requests_per_ask"] == 1, result
        assert result["fallback"]["max_elapsed_s"] < 1.0, result
