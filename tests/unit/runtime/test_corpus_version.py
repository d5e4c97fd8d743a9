"""The corpus version (real Redis): one key format, a bump that only moves forward (also past a flushed key), reads
that step aside while a failed bump is pending, process-local versions without Redis, and readers' mirrors that
follow the bumps' messages (no round trip), fall back to Redis without their subscription, and age out."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.runtime import corpus_version
from services.runtime import redis_client as redis_factory
from services.runtime.corpus_version import CorpusVersions, VersionMirror
from tests.conftest import REDIS_URL


def test_one_key_format():
    assert corpus_version.KEY_FORMAT == "ragfleet:retrieval:version:{tenant}"
    assert corpus_version.version_key("acme") == "ragfleet:retrieval:version:acme"
    assert corpus_version.version_key("acme", corpus_version.key_format("p:")) == "p:version:acme"
    assert corpus_version.parse(None) == 0 and corpus_version.parse(b"12") == 12


async def test_bumps_count_up_and_every_reader_sees_them(redis_client, redis_prefix):
    template = corpus_version.key_format(redis_prefix)
    writer, other_writer = (CorpusVersions(redis_client, template=template),
                            CorpusVersions(redis_client, template=template))
    assert await writer.read("t") == 0
    await asyncio.wait_for(writer._mirror.subscribed.wait(), 3)  # type: ignore[union-attr]
    assert await writer.bump("t") == 1 and await other_writer.bump("t") == 2
    assert await corpus_version.read(redis_client, "t", template=template) == 2
    # The other writer's bump reaches this one's mirror as a message: within a few ms, not at once.
    await _until(lambda: _reads(writer, "t", 2), timeout=1.0)
    assert await writer.read("u") == 0, "versions are per tenant"
    await writer.close()
    await other_writer.close()


async def test_a_flushed_key_never_brings_back_a_version(redis_client, redis_prefix):
    versions = CorpusVersions(redis_client, template=corpus_version.key_format(redis_prefix))
    for _ in range(3):
        await versions.bump("t")
    await redis_client.delete(redis_prefix + "version:t")  # a flush, or an eviction
    assert await versions.bump("t") == 4


async def test_a_failed_bump_blocks_reads_until_it_lands(redis_client, redis_prefix):
    versions = CorpusVersions(redis_client, template=corpus_version.key_format(redis_prefix))
    assert await versions.bump("t") == 1
    real = redis_client.evalsha

    async def blip(*args, **kwargs):
        raise ConnectionError("redis blip")

    redis_client.evalsha = blip
    assert await versions.bump("t") is None
    assert await versions.read("t") is None, "the stored version still admits entries from before the write"
    redis_client.evalsha = real
    assert await versions.read("t") == 2
    assert await versions.bump("t") == 3


async def test_without_redis_versions_are_local():
    versions = CorpusVersions(None)
    assert await versions.read("t") == 0
    assert await versions.bump("t") == 1 and await versions.bump("t") == 2 and await versions.read("t") == 2


async def test_a_dead_redis_means_no_version_never_an_error():
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    versions = CorpusVersions(client)
    assert await versions.read("t") is None and await versions.bump("t") is None
    with pytest.raises(Exception):
        await corpus_version.read(client, "t")  # a reader decides for itself what a failure means
    await client.aclose()


def _counting_gets(client):
    """Count the GETs `client` sends (the mirror's reason to exist is sending none)."""
    calls = []
    real = client.get

    async def get(*args, **kwargs):
        calls.append(args)
        return await real(*args, **kwargs)

    client.get = get
    return calls


async def _until(predicate, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_mirror_follows_every_writers_bumps_without_reading_redis(redis_client, redis_prefix):
    template = corpus_version.key_format(redis_prefix)
    writer = CorpusVersions(redis_client, template=template)
    reader_client = redis_factory.connect(REDIS_URL)
    gets = _counting_gets(reader_client)
    mirror = VersionMirror(reader_client, template=template)
    try:
        assert await mirror.read("t") == 0 and len(gets) == 1  # unknown: read from Redis...
        await asyncio.wait_for(mirror.subscribed.wait(), 3)
        assert await mirror.read("t") == 0 and len(gets) == 2  # ...and kept once the subscription is live
        for _ in range(50):
            assert await mirror.read("t") == 0
        assert len(gets) == 2, "a known, fresh version costs no round trip"
        for expected in (1, 2, 3):
            assert await writer.bump("t") == expected
            await _until(lambda: _reads(mirror, "t", expected))
        assert len(gets) == 2, "bumps arrive as messages, not reads"
        assert await mirror.read("other") == 0 and len(gets) == 3, "versions are per tenant"
    finally:
        await mirror.close()
        await writer.close()
        await reader_client.aclose()


async def _reads(mirror, tenant: str, expected: int) -> bool:
    return await mirror.read(tenant) == expected


async def test_a_lost_subscription_reads_redis_until_it_is_back(redis_client, redis_prefix):
    template = corpus_version.key_format(redis_prefix)
    writer = CorpusVersions(redis_client, template=template)
    reader_client = redis_factory.connect(REDIS_URL)
    gets = _counting_gets(reader_client)
    before = {c["id"] for c in await redis_client.client_list(_type="pubsub")}
    mirror = VersionMirror(reader_client, template=template)
    try:
        await mirror.read("t")
        await asyncio.wait_for(mirror.subscribed.wait(), 3)
        ours = [c["id"] for c in await redis_client.client_list(_type="pubsub") if c["id"] not in before]
        assert ours, "the mirror holds a subscription"
        await mirror.read("t")
        for client_id in ours:
            await redis_client.client_kill_filter(_id=client_id)
        await _until(lambda: _not_live(mirror))
        # A bump nobody hears while the subscription is down is still seen: reads go to Redis meanwhile.
        assert await writer.bump("t") == 1
        read_before = len(gets)
        assert await mirror.read("t") == 1 and len(gets) == read_before + 1
        await asyncio.wait_for(mirror.subscribed.wait(), 3)  # it subscribes again by itself
        assert await writer.bump("t") == 2
        await _until(lambda: _reads(mirror, "t", 2))
    finally:
        await mirror.close()
        await writer.close()
        await reader_client.aclose()


async def _not_live(mirror) -> bool:
    return not mirror.subscribed.is_set()


async def test_a_bump_that_was_never_announced_is_seen_within_the_max_age(redis_client, redis_prefix):
    """A writer of an older release bumps without publishing: the mirror's copy ages out and is read again."""
    template = corpus_version.key_format(redis_prefix)
    mirror = VersionMirror(redis_client, template=template, max_age=0.2)
    try:
        await mirror.read("t")
        await asyncio.wait_for(mirror.subscribed.wait(), 3)
        assert await mirror.read("t") == 0
        await redis_client.incr(corpus_version.version_key("t", template))  # no message
        assert await mirror.read("t") == 0  # not yet: the copy is fresh
        await asyncio.sleep(0.25)
        assert await mirror.read("t") == 1
    finally:
        await mirror.close()


async def test_the_writers_own_bump_is_read_back_at_once(redis_client, redis_prefix):
    versions = CorpusVersions(redis_client, template=corpus_version.key_format(redis_prefix))
    gets = _counting_gets(redis_client)
    try:
        await versions.read("t")
        await asyncio.wait_for(versions._mirror.subscribed.wait(), 3)  # type: ignore[union-attr]
        await versions.read("t")
        reads = len(gets)
        for expected in range(1, 6):
            assert await versions.bump("t") == expected
            assert await versions.read("t") == expected  # from the bump's own reply, not a message or a GET
        assert len(gets) == reads
    finally:
        await versions.close()
