"""Redis clean-up for tests and benchmarks: each run writes under its own key prefix and deletes it afterwards."""

from __future__ import annotations

import redis

from tests.conftest import REDIS_URL


def delete_keys(*patterns: str, url: str = REDIS_URL) -> int:
    """Delete every key matching any of `patterns` (globs, e.g. a run's prefix + "*"); returns how many went."""
    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                deleted += client.delete(*keys)
        return deleted
    finally:
        client.close()
