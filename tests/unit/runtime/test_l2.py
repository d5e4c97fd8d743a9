"""The shared L2 over real Redis: TTL and prefix, encoding hooks, and an outage read as misses with one log line,
counted errors and a back-off."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter

from services.cli.mesh import free_port
from services.runtime.l2 import RedisL2
from services.runtime.redis_client import connect

log = logging.getLogger("ragfleet.test.l2")


async def test_round_trip_under_the_prefix_with_the_ttl(redis_client, redis_prefix):
    l2 = RedisL2[bytes](redis_client, ttl_seconds=30, log=log, prefix=redis_prefix)
    await l2.put_many([("a", b"1"), ("b", b"2")])
    assert await l2.get_many(["a", "missing", "b"]) == [b"1", None, b"2"]
    await l2.put("c", b"3")
    assert await l2.get("c") == b"3"
    assert 0 < await redis_client.ttl(redis_prefix + "a") <= 30


class Text(RedisL2[str]):
    def _encode(self, value: str) -> bytes:
        return value.encode()

    def _decode(self, raw: bytes) -> str | None:
        return None if raw == b"bad" else raw.decode()


async def test_subclasses_choose_the_encoding_and_what_reads_as_a_miss(redis_client, redis_prefix):
    l2 = Text(redis_client, ttl_seconds=30, log=log, prefix=redis_prefix)
    await l2.put("k", "héllo")
    await redis_client.set(redis_prefix + "bad", b"bad")
    assert await l2.get_many(["k", "bad"]) == ["héllo", None]


async def test_an_outage_is_misses_logged_once_counted_and_backed_off(caplog):
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    errors = Counter("test_l2_errors", "failed commands", registry=CollectorRegistry())
    l2 = RedisL2[bytes](dead, ttl_seconds=30, log=log, errors=errors)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert await l2.get_many(["a", "b"]) == [None, None]
        assert not l2.available
        await l2.put("a", b"1")  # skipped during the back-off: no error, no delay
        l2._retry_at = 0  # back-off over: the next call probes Redis and fails again
        assert await l2.get("a") is None
    await dead.aclose()
    assert errors._value.get() == 2
    assert len(caplog.records) == 1 and "redis MGET failed" in caplog.records[0].getMessage()
