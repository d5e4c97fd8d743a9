"""retrieval, embedding and generation each SIGKILLed while Ask streams are open and documents are being ingested,
then restarted on the same data dir: every open stream ends with a status (OK or UNAVAILABLE) well within its
deadline, none hangs, and every acknowledged document (and every one replayed after a failure) is searchable
exactly once: 0 lost, 0 duplicated.
"""

from __future__ import annotations

import pytest

from tests.faults._mesh import FaultMesh
from tests.faults._scenarios import kill_during_load


@pytest.mark.parametrize("service", ["retrieval", "embedding", "generation"])
async def test_sigkill_during_streams_loses_nothing_and_hangs_nothing(fm: FaultMesh, service: str) -> None:
    r = await kill_during_load(fm, service, askers=3, deadline=8.0)
    assert r["acked_documents"] > 0, r
    assert r["lost_documents"] == [] and r["duplicated_documents"] == [], r
    assert r["hanging_streams"] == 0 and r["unexpected_codes"] == [], r
    assert r["open_at_kill"] > 0, r
    # A dead peer is noticed at once (connection reset), not at the 8 s deadline.
    assert r["open_at_kill_max_end_after_kill_s"] < 5.0, r
    if service == "generation":
        assert r["mid_answer_at_kill"] > 0 and r["open_at_kill_codes"].get("UNAVAILABLE", 0) > 0, r
