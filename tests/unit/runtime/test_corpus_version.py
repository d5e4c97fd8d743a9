"""The corpus version (real Redis): one key format, a bump that only moves forward (also past a flushed key), reads
that step aside while a failed bump is pending, and process-local versions without Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.runtime import corpus_version
from services.runtime.corpus_version import CorpusVersions


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
    assert await writer.bump("t") == 1 and await other_writer.bump("t") == 2
    assert await writer.read("t") == 2 == await corpus_version.read(redis_client, "t", template=template)
    assert await writer.read("u") == 0, "versions are per tenant"


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
