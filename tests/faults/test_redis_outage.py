"""Redis unreachable mid-load (a proxy cut: refused connects, open connections reset), then back on the same address.

0 failed Asks before, during and after; while it is down every cache steps aside (the gateway's lookups count as
errors, embedding counts Redis errors) and once it is back the L2 caches are written again (new keys appear).
"""

from __future__ import annotations

from tests.faults._mesh import FaultMesh
from tests.faults._scenarios import redis_outage


async def test_redis_outage_fails_no_ask_and_l2_comes_back(fm: FaultMesh) -> None:
    r = await redis_outage(fm, askers=3, up_s=1.0, down_s=2.5, after_s=1.0)
    assert r["phases"]["down"]["asks"] >= 3, r
    assert r["failed_total"] == 0, r
    assert r["bypassed_cache_lookups_while_down"] > 0, r
    assert r["embedding_redis_errors_while_down"] > 0, r
    assert r["redis_bytes_after_restore"] > 0, r
    assert r["l2_back_after_s"] is not None, r
