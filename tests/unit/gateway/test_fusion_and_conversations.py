"""Query variants + RRF fusion, conversation store (in-process and Redis; in-process expiry), fan-out helper."""

import asyncio
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from services.gateway.concurrency import gather_or_cancel
from services.gateway.config import ConversationConfig
from services.gateway.conversations import ConversationStore
from services.gateway.fusion import query_variants, rrf_merge
from services.runtime import lru
from services.runtime.pb.ragfleet.v1 import common_pb2, retrieval_pb2
from tests.conftest import REDIS_URL


def _hits(*ids):
    return [retrieval_pb2.SearchHit(chunk_id=i, score=1.0 / (n + 1)) for n, i in enumerate(ids)]


def test_variants():
    assert query_variants("What is the boiling point of water?", 1) == ["What is the boiling point of water?"]
    assert query_variants("What is the boiling point of water?", 3) == [
        "What is the boiling point of water?", "boiling point water"]


def test_rrf_prefers_chunks_ranked_in_several_lists():
    merged = rrf_merge([_hits("a", "b", "c"), _hits("c", "d", "b")], top_k=3)
    # c: 1/61 + 1/63 > b: 1/62 + 1/63 > a: 1/61 > d: 1/62
    assert [h.chunk_id for h in merged] == ["c", "b", "a"]
    assert [h.chunk_id for h in rrf_merge([_hits("x", "y")], top_k=1)] == ["x"]


@pytest.mark.parametrize("use_redis", [False, True])
async def test_conversation_store(use_redis, redis_prefix):
    client = aioredis.from_url(REDIS_URL) if use_redis else None
    store = ConversationStore(ConversationConfig(ttl_seconds=60, max_turns=4), client, prefix=redis_prefix)
    try:
        assert await store.history("t", "c1") == []
        for i in range(3):
            await store.append("t", "c1", f"q{i}", f"a{i}")
        turns = await store.history("t", "c1")
        assert [(t.role, t.content) for t in turns] == [
            (common_pb2.ROLE_USER, "q1"), (common_pb2.ROLE_ASSISTANT, "a1"),
            (common_pb2.ROLE_USER, "q2"), (common_pb2.ROLE_ASSISTANT, "a2")]
        assert await store.history("other-tenant", "c1") == [], "conversations are per tenant"
        if client is not None:
            ttl = await client.ttl(store.key("t", "c1"))
            assert 0 < ttl <= 60
    finally:
        if client is not None:
            await client.delete(store.key("t", "c1"))
            await client.aclose()


@pytest.mark.parametrize("use_redis", [False, True])
async def test_conversation_ids_with_colons_never_reach_another_tenant(use_redis, redis_cleanup):
    """Tenant "acme" with id "eu:1" must not read tenant "acme:eu"'s conversation "1" (nor the reverse)."""
    client = aioredis.from_url(REDIS_URL) if use_redis else None
    store = ConversationStore(ConversationConfig(ttl_seconds=60, max_turns=4), client, prefix=redis_cleanup)
    try:
        await store.append("acme:eu", "1", "secret question", "secret answer")
        assert await store.history("acme", "eu:1") == []
        await store.append("acme", "eu:1", "acme question", "acme answer")
        assert [t.content for t in await store.history("acme:eu", "1")] == ["secret question", "secret answer"]
        assert [t.content for t in await store.history("acme", "eu:1")] == ["acme question", "acme answer"]
        assert store.key("acme", "eu:1") != store.key("acme:eu", "1")
    finally:
        if client is not None:
            await client.aclose()


async def test_in_process_conversation_expires_ttl_after_its_last_turn(monkeypatch):
    now = [1000.0]
    # Only the store's own clock (its LRU's) moves; the event loop keeps the real one.
    monkeypatch.setattr(lru, "time", SimpleNamespace(monotonic=lambda: now[0]))
    store = ConversationStore(ConversationConfig(ttl_seconds=60, max_turns=20), None, prefix="exp:")

    async def contents() -> list[str]:
        return [t.content for t in await store.history("t", "c")]

    await store.append("t", "c", "q0", "a0")
    now[0] = 1050.0
    await store.append("t", "c", "q1", "a1")  # pushes the expiry to 1110
    now[0] = 1109.9
    assert await contents() == ["q0", "a0", "q1", "a1"], "kept until ttl_seconds after the LAST turn"
    now[0] = 1110.1
    assert await contents() == [], "expired"
    await store.append("t", "c", "q2", "a2")  # expires at 1170.1, unread
    now[0] = 1200.0
    await store.append("t", "c", "q3", "a3")
    assert await contents() == ["q3", "a3"], "a turn after expiry starts afresh, without the expired turns"


async def test_gather_or_cancel_cancels_siblings_and_keeps_the_error():
    cancelled = asyncio.Event()

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fail():
        await asyncio.sleep(0.01)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await gather_or_cancel([slow(), fail()])
    assert cancelled.is_set()
    assert await gather_or_cancel([asyncio.sleep(0, result=1), asyncio.sleep(0, result=2)]) == [1, 2]
