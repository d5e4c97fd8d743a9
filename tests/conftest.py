"""Shared test fixtures. Service-specific fixtures live in the conftest.py of each test folder."""

from __future__ import annotations

import os
import uuid

import pytest

from services.runtime import redis_client as redis_factory

REDIS_URL = os.environ.get("RAGFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to one test; tests that write Redis keys delete everything under it afterwards."""
    return f"ragfleet-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis_cleanup(redis_prefix: str):
    """The test's key prefix, for a test that writes Redis: every key under it is deleted afterwards."""
    yield redis_prefix
    client = redis_factory.connect(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(redis_cleanup: str):
    """An async client of the test Redis, built as the services build theirs (keys under the test's prefix are
    deleted afterwards)."""
    client = redis_factory.connect(REDIS_URL)
    yield client
    await client.aclose()
