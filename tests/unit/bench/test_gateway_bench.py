"""bench/gateway_bench.py's bounded search for the most concurrent streams a tree holds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/ is scripts, not an installed package

from bench.gateway_bench import StreamSearch  # noqa: E402


def run_search(search: StreamSearch, holds_up_to: int) -> list[int]:
    while (n := search.next_level()) is not None:
        search.record(n, held=n <= holds_up_to)
    return search.tried


@pytest.mark.parametrize("limit", [0, 30, 99, 100, 230, 512, 700, 5000])
def test_the_search_brackets_the_limit_within_its_bound(limit: int) -> None:
    search = StreamSearch(start=50, cap=1600, steps=12)
    tried = run_search(search, limit)
    assert len(tried) == len(set(tried)) <= 12
    assert search.held == max([n for n in tried if n <= limit], default=0)
    if limit >= 1600:
        assert search.held == 1600 and search.failed is None
    else:
        assert search.held <= limit < search.failed
        assert search.failed - search.held <= max(10, search.held // 10)


def test_the_search_stops_after_its_steps() -> None:
    search = StreamSearch(start=25, cap=100, steps=3)
    assert run_search(search, 1000) == [25, 50, 100]
    search = StreamSearch(start=50, cap=1600, steps=4)
    assert run_search(search, 230) == [50, 100, 200, 400] and search.held == 200 and search.failed == 400
