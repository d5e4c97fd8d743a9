"""Response cache: key normalisation and isolation, corpus-version invalidation across replicas, semantic match
(per request fingerprint), and the TTL in Redis, L1 and the semantic index alike. The version is advanced by its
owner (retrieval, through runtime.corpus_version); the cache only reads it."""

import asyncio

import redis.asyncio as aioredis

from services.gateway.config import CacheConfig
from services.gateway.response_cache import CachedAnswer, ResponseCache, cache_key, normalise_question
from services.runtime.corpus_version import CorpusVersions


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


def _config(prefix: str, **kw) -> CacheConfig:
    return CacheConfig(redis_prefix=prefix, corpus_version_key=prefix + "version:{tenant}", **kw)


async def test_in_process_hit_and_invalidation():
    cache = ResponseCache(_config("t:"), None)
    key = cache.key("a", "q", b"")
    version, hit = await cache.lookup("a", key)
    assert hit is None
    await cache.store("a", key, _entry(version), None, fingerprint=b"")
    assert (await cache.lookup("a", key))[1] == _entry(version)
    cache.note_write("a")  # without Redis, the writes this process sent are the version
    assert (await cache.lookup("a", key))[1] is None, "a corpus change invalidates"
    assert (await cache.lookup("b", cache.key("b", "q", b"")))[1] is None


async def test_redis_shared_between_replicas_and_bump_invalidates_everywhere(redis_client, redis_prefix):
    replica_a = ResponseCache(_config(redis_prefix), redis_client)
    replica_b = ResponseCache(_config(redis_prefix), redis_client)
    key = replica_a.key("acme", "what is x", b"p")
    version, hit = await replica_a.lookup("acme", key)
    assert hit is None
    await replica_a.store("acme", key, _entry(version), None, fingerprint=b"p")
    # replica B has nothing in L1 but finds it in Redis; then has it in L1 too
    assert (await replica_b.lookup("acme", key))[1] == _entry(version)
    # an ingest (through any replica) makes retrieval bump the shared version: replica B's L1 copy must not be served
    new_version = await CorpusVersions(redis_client, template=redis_prefix + "version:{tenant}").bump("acme")
    assert new_version > version
    v_b, hit_b = await replica_b.lookup("acme", key)
    assert hit_b is None and v_b == new_version
    # another tenant's lookups never see acme's entry, even with an identical question
    other = replica_b.key("globex", "what is x", b"p")
    assert (await replica_b.lookup("globex", other))[1] is None


async def test_bump_never_reuses_a_version_after_a_flush(redis_client, redis_prefix):
    versions = CorpusVersions(redis_client, template=redis_prefix + "version:{tenant}")
    first = await versions.bump("t")
    await redis_client.delete(redis_prefix + "version:t")
    assert await versions.bump("t") > first


async def test_redis_failure_steps_aside():
    broken = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache = ResponseCache(_config("x:"), broken)
    version, hit = await cache.lookup("a", cache.key("a", "q", b""))
    assert version is None and hit is None
    await broken.aclose()


async def test_semantic_match_same_tenant_and_version_only():
    cache = ResponseCache(_config("s:", semantic=True, semantic_threshold=0.9), None)
    await cache.store("a", cache.key("a", "q1", b""), _entry(0), [1.0, 0.0, 0.0], fingerprint=b"")
    assert cache.lookup_semantic("a", 0, [0.99, 0.05, 0.0], fingerprint=b"") == _entry(0)
    assert cache.lookup_semantic("a", 0, [0.0, 1.0, 0.0], fingerprint=b"") is None, "below threshold"
    assert cache.lookup_semantic("b", 0, [1.0, 0.0, 0.0], fingerprint=b"") is None, "other tenant"
    assert cache.lookup_semantic("a", 1, [1.0, 0.0, 0.0], fingerprint=b"") is None, "other corpus version"
    cache.note_write("a")
    assert cache.lookup_semantic("a", 0, [1.0, 0.0, 0.0], fingerprint=b"") is None


async def test_semantic_match_needs_the_same_request_fingerprint():
    """Filters, top_k, mode and generation params shape the answer: a close question asked with other ones
    must not get this answer."""
    cache = ResponseCache(_config("s:", semantic=True, semantic_threshold=0.9), None)
    await cache.store("a", cache.key("a", "q", b"filter=contract-A"), _entry(0, "A's refund policy"),
                      [1.0, 0.0], fingerprint=b"filter=contract-A")
    assert cache.lookup_semantic("a", 0, [1.0, 0.0], fingerprint=b"filter=contract-B") is None
    assert cache.lookup_semantic("a", 0, [1.0, 0.0], fingerprint=b"") is None
    await cache.store("a", cache.key("a", "q", b"filter=contract-B"), _entry(0, "B's refund policy"),
                      [1.0, 0.0], fingerprint=b"filter=contract-B")
    assert cache.lookup_semantic("a", 0, [0.99, 0.01], fingerprint=b"filter=contract-A").answer == "A's refund policy"
    assert cache.lookup_semantic("a", 0, [0.99, 0.01], fingerprint=b"filter=contract-B").answer == "B's refund policy"


async def test_ttl_applies_in_process_to_l1_and_semantic_entries():
    cache = ResponseCache(_config("t:", ttl_seconds=1, semantic=True, semantic_threshold=0.9), None)
    key = cache.key("a", "q", b"")
    await cache.store("a", key, _entry(0), [1.0, 0.0], fingerprint=b"")
    assert cache.has_local(key) and (await cache.lookup("a", key))[1] == _entry(0)
    assert cache.lookup_semantic("a", 0, [1.0, 0.0], fingerprint=b"") == _entry(0)
    await asyncio.sleep(1.1)
    assert not cache.has_local(key), "an expired entry is not 'hot'"
    assert (await cache.lookup("a", key)) == (0, None), "expired: a miss, also without Redis"
    assert cache.lookup_semantic("a", 0, [1.0, 0.0], fingerprint=b"") is None


async def test_ttl_of_an_l1_copy_ends_with_the_redis_entry(redis_client, redis_prefix):
    writer = ResponseCache(_config(redis_prefix, ttl_seconds=1), redis_client)
    reader = ResponseCache(_config(redis_prefix, ttl_seconds=1), redis_client)
    key = writer.key("a", "q", b"")
    version, _ = await writer.lookup("a", key)
    await writer.store("a", key, _entry(version), None, fingerprint=b"")
    await asyncio.sleep(0.6)
    assert (await reader.lookup("a", key))[1] == _entry(version), "copied into the reader's L1 with ~0.4 s left"
    await asyncio.sleep(0.55)
    assert not await redis_client.exists(key)
    assert not reader.has_local(key), "the L1 copy must not outlive the Redis entry it came from"
    assert not writer.has_local(key)
    assert (await reader.lookup("a", key))[1] is None and (await writer.lookup("a", key))[1] is None


def test_an_entry_in_the_earlier_json_format_still_reads():
    """A replica of the previous release writes JSON with the Sources in hex; this one reads both."""
    import json

    entry = _entry(3, "héllo [1]")
    legacy = json.dumps({"v": 3, "a": entry.answer, "s": entry.sources.hex(), "f": entry.finish_reason,
                         "u": list(entry.usage), "m": entry.model}, separators=(",", ":")).encode()
    assert CachedAnswer.from_bytes(legacy) == entry
    assert len(entry.to_bytes()) < len(legacy)


def _store_failures(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ragfleet_gateway_cache_store_failures_total", {"reason": reason}) or 0.0


async def test_store_later_keeps_the_answer_here_at_once_and_in_redis_after_the_write(redis_client, redis_prefix):
    writer = ResponseCache(_config(redis_prefix), redis_client)
    reader = ResponseCache(_config(redis_prefix), redis_client)
    key = writer.key("acme", "q", b"")
    version, _ = await writer.lookup("acme", key)
    writer.store_later("acme", key, _entry(version), None, fingerprint=b"", timeout=1.0)
    assert writer.has_local(key), "this replica serves it from the next lookup on, before Redis has it"
    await writer.flush()
    assert writer.pending_writes == 0
    assert (await reader.lookup("acme", key))[1] == _entry(version), "another replica finds it in Redis"
    assert 0 < await redis_client.ttl(key) <= writer.config.ttl_seconds


async def test_store_later_is_bounded_and_counts_what_it_skips(redis_client, redis_prefix, monkeypatch):
    from services.gateway import response_cache

    cache = ResponseCache(_config(redis_prefix), redis_client)
    monkeypatch.setattr(response_cache, "MAX_PENDING_WRITES", 2)
    overflow = _store_failures("overflow")
    keys = [cache.key("a", f"q{i}", b"") for i in range(3)]
    for key in keys:
        cache.store_later("a", key, _entry(0), None, fingerprint=b"", timeout=1.0)
    assert cache.pending_writes == 2 and _store_failures("overflow") == overflow + 1
    assert all(cache.has_local(key) for key in keys), "a skipped Redis write still leaves the local copy"
    await cache.flush()
    assert [await redis_client.exists(key) for key in keys] == [1, 1, 0]

    timeouts = _store_failures("timeout")

    class Hung:
        async def set(self, *args, **kwargs):
            await asyncio.sleep(10)

    hung = ResponseCache(_config(redis_prefix), redis_client)
    hung._l2._client = Hung()
    hung.store_later("a", keys[2], _entry(0), None, fingerprint=b"", timeout=0.05)
    await hung.flush()
    assert _store_failures("timeout") == timeouts + 1 and hung.pending_writes == 0


async def test_with_the_versions_followed_an_l1_hit_costs_no_redis_command(redis_client, redis_prefix):
    """The corpus version comes from the mirror (retrieval's change messages): a hot answer is served with no round
    trip, another replica's bump still invalidates it within a message's delivery, and this replica's own write
    (note_version, from retrieval's reply) at once."""
    replica = ResponseCache(_config(redis_prefix), redis_client)
    writer = CorpusVersions(redis_client, template=redis_prefix + "version:{tenant}")
    key = replica.key("acme", "what is x", b"p")
    try:
        version, _ = await replica.lookup("acme", key)
        await replica.store("acme", key, _entry(version), None, fingerprint=b"p")
        await asyncio.wait_for(replica._versions.subscribed.wait(), 3)  # type: ignore[union-attr]
        await replica.lookup("acme", key)  # the version, read once the subscription is live, is kept
        commands = []
        real = redis_client.execute_command

        async def counted(*args, **kwargs):
            commands.append(args[0])
            return await real(*args, **kwargs)

        redis_client.execute_command = counted
        for _ in range(20):
            assert (await replica.lookup("acme", key))[1] == _entry(version)
        assert commands == [], "a hit on a followed version sends nothing to Redis"
        redis_client.execute_command = real
        assert replica.lookup_hot("acme", key) == (version, _entry(version))  # the same, with no await at all
        assert replica.lookup_hot("acme", replica.key("acme", "not asked", b"p")) is None
        assert replica.lookup_hot("globex", key) is None, "a version never read is not known"

        new_version = await writer.bump("acme")  # an ingest through another gateway
        deadline = asyncio.get_running_loop().time() + 1.0
        while (await replica.lookup("acme", key))[1] is not None:
            assert asyncio.get_running_loop().time() < deadline, "the bump's message never arrived"
            await asyncio.sleep(0.001)
        assert (await replica.lookup("acme", key))[0] == new_version
        assert replica.lookup_hot("acme", key) is None, "the entry is of the old version"

        await replica.store("acme", key, _entry(new_version), None, fingerprint=b"p")
        replica.note_write("acme")  # this gateway's own ingest...
        own = await CorpusVersions(redis_client, template=redis_prefix + "version:{tenant}").bump("acme")
        replica.note_version("acme", own)  # ...whose reply carries the version: seen before any message
        assert await replica.current_version("acme") == own
    finally:
        await replica.close()
        await writer.close()
