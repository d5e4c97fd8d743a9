"""Fixtures shared by the gateway's unit tests."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL


@pytest.fixture
async def redis_client(redis_prefix):
    client = aioredis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
