"""Added latency between the gateway and one upstream (a TCP proxy the test controls): the per-stage budgets hold.

Within its budget the Ask answers and reports the slowed stage as the slow one; past the stage budget (1 s here) it
fails DEADLINE_EXCEEDED naming that service after about the budget, not the client's 8 s; past the client's own
deadline it fails DEADLINE_EXCEEDED at that deadline.
"""

from __future__ import annotations

import pytest

from tests.faults._mesh import STAGE_BUDGET, FaultMesh
from tests.faults._scenarios import slow_hop

SLACK = 1.0  # seconds: process scheduling on a loaded 2-core machine


async def test_slow_retrieval_within_budget_answers_and_reports_the_stage(fm: FaultMesh) -> None:
    r = await slow_hop(fm, "retrieval_slow_within_budget")
    assert r["codes"] == {"OK": 3}, r
    assert r["slowest_stage"] == {"retrieve": 3}, r
    assert all(x["timings"]["retrieve"] >= 2 * 0.15 * 1000 for x in r["results"]), r


@pytest.mark.parametrize("name, service", [("retrieval_past_stage_budget", "retrieval"),
                                           ("embedding_past_stage_budget", "embedding")])
async def test_a_hop_past_its_stage_budget_fails_at_the_budget_naming_the_stage(fm: FaultMesh, name: str,
                                                                               service: str) -> None:
    r = await slow_hop(fm, name)
    assert r["codes"] == {"DEADLINE_EXCEEDED": 3}, r
    assert r["details"] and all(f"{service} service" in d for d in r["details"]), r["details"]
    # The embed stage runs first (its budget is spent), then retrieve: at most two budgets, never the client's 8 s.
    assert r["max_elapsed_s"] <= 2 * STAGE_BUDGET + SLACK, r


async def test_a_slow_hop_past_the_client_deadline_fails_at_that_deadline(fm: FaultMesh) -> None:
    r = await slow_hop(fm, "retrieval_past_client_deadline")
    assert r["codes"] == {"DEADLINE_EXCEEDED": 3}, r
    assert r["max_elapsed_s"] <= r["deadline_s"] + SLACK, r
