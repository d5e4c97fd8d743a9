"""Shared test fixtures. Service-specific fixtures live in the conftest.py of each test folder."""

from __future__ import annotations

import os
import uuid

import pytest

from services.runtime import redis_client as redis_factory

REDIS_URL = os.environ.get("RAGFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def span_exporter():
    """Spans the process's SDK tracer provider records from now on (installed here when no test did before); the
    exporter is detached at teardown, so later tests' spans do not reach it."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    trace.get_tracer_provider().add_span_processor(processor)  # type: ignore[attr-defined]
    yield exporter
    processor.shutdown()


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
