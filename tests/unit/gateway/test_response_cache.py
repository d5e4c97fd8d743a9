"""Response cache: key normalisation and isolation, corpus-version invalidation across replicas, semantic match."""

import pytest
import redis.asyncio as aioredis

from services.gateway.config import CacheConfig
from services.gateway.response_cache import CachedAnswer, ResponseCache, cache_key, normalise_question
from tests.conftest import REDIS_URL


def _entry(version: int, answer: str = "answer [1]") -> CachedAnswer:
    return CachedAnswer(version, answer, b"\x0a\x02\x08\x01", 1, (10, 5, 15), "sim")


def test_normalisation_and_keys():
    assert normalise_question("  What IS   RAG? ") == normalise_question("what is rag")
    assert cache_key("p:", "a", "What is RAG?", b"f") == cache_key("p:", "a", "what  is rag", b"f")
    assert cache_key("p:", "a", "q", b"f") != cache_key("p:", "b", "q", b"f"), "tenant is part of the key"
    assert cache_key("p:", "a", "q", b"f1") != cache_key("p:", "a", "q", b"f2"), "params are part of the key"
    assert cache_key("p:", "acme", "q", b"f").startswith("p:ans:acme:")


def test_entry_roundtrip():
    entry = _entry(7, "héllo")
    assert CachedAnswer.from_bytes(entry.to_bytes()) == entry


@pytest.fixture
async def redis_client(redis_prefix):
    client = aioredis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _config(prefix: str, **kw) -> CacheConfig:
    return CacheConfig(redis_prefix=prefix, corpus_version_key=prefix + "version:{tenant}", **kw)


async def test_in_process_hit_and_invalidation():
    cache = ResponseCache(_config("t:"), None)
    key = cache.key("a", "q", b"")
    version, hit = await cache.lookup("a", key)
    assert hit is None
    await cache.store("a", key, _entry(version), None)
    assert (await cache.lookup("a", key))[1] == _entry(version)
    await cache.bump_version("a")
    assert (await cache.lookup("a", key))[1] is None, "a corpus change invalidates"
    assert (await cache.lookup("b", cache.key("b", "q", b"")))[1] is None


async def test_redis_shared_between_replicas_and_bump_invalidates_everywhere(redis_client, redis_prefix):
    replica_a = ResponseCache(_config(redis_prefix), redis_client)
    replica_b = ResponseCache(_config(redis_prefix), redis_client)
    key = replica_a.key("acme", "what is x", b"p")
    version, hit = await replica_a.lookup("acme", key)
    assert hit is None
    await replica_a.store("acme", key, _entry(version), None)
    # replica B has nothing in L1 but finds it in Redis; then has it in L1 too
    assert (await replica_b.lookup("acme", key))[1] == _entry(version)
    # an ingest through replica A bumps the shared version: replica B's L1 copy must not be served
    new_version = await replica_a.bump_version("acme")
    assert new_version > version
    v_b, hit_b = await replica_b.lookup("acme", key)
    assert hit_b is None and v_b == new_version
    # another tenant's lookups never see acme's entry, even with an identical question
    other = replica_b.key("globex", "what is x", b"p")
    assert (await replica_b.lookup("globex", other))[1] is None


async def test_bump_never_reuses_a_version_after_a_flush(redis_client, redis_prefix):
    cache = ResponseCache(_config(redis_prefix), redis_client)
    first = await cache.bump_version("t")
    await redis_client.delete(redis_prefix + "version:t")
    assert await cache.bump_version("t") > first


async def test_redis_failure_steps_aside():
    broken = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache = ResponseCache(_config("x:"), broken)
    version, hit = await cache.lookup("a", cache.key("a", "q", b""))
    assert version is None and hit is None
    await broken.aclose()


async def test_semantic_match_same_tenant_and_version_only():
    cache = ResponseCache(_config("s:", semantic=True, semantic_threshold=0.9), None)
    await cache.store("a", cache.key("a", "q1", b""), _entry(0), [1.0, 0.0, 0.0])
    assert cache.lookup_semantic("a", 0, [0.99, 0.05, 0.0]) == _entry(0)
    assert cache.lookup_semantic("a", 0, [0.0, 1.0, 0.0]) is None, "below threshold"
    assert cache.lookup_semantic("b", 0, [1.0, 0.0, 0.0]) is None, "other tenant"
    assert cache.lookup_semantic("a", 1, [1.0, 0.0, 0.0]) is None, "other corpus version"
    await cache.bump_version("a")
    assert cache.lookup_semantic("a", 0, [1.0, 0.0, 0.0]) is None
