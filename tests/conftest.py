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
async def redis_client(redis_prefix: str):
    """An async client of the test Redis, built as the services build theirs; the test's keys (under
    ``redis_prefix``) are deleted afterwards."""
    client = redis_factory.connect(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
