"""Redis clean-up for tests: each run writes under its own key prefix and deletes it afterwards. The helper itself
lives in bench/_common.py (the benchmarks use it too, and bench must not import from tests); here it defaults to the
test Redis (RAGFLEET_TEST_REDIS_URL)."""

from __future__ import annotations

from bench._common import delete_keys as _delete_keys
from tests.conftest import REDIS_URL


def delete_keys(*patterns: str, url: str = REDIS_URL) -> int:
    """Delete every key matching any of `patterns` (globs, e.g. a run's prefix + "*"); returns how many went."""
    return _delete_keys(*patterns, url=url)
