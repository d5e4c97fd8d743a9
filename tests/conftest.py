"""Shared test fixtures. Service-specific fixtures live in the conftest.py of each test folder."""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("RAGFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to one test; tests that write Redis keys delete everything under it afterwards."""
    return f"ragfleet-test:{uuid.uuid4().hex[:12]}:"
