"""L1 (bytes-bounded LRU with TTL) and L2 (the real Redis on 127.0.0.1:6379): values, TTL, outages, reconnection."""

from __future__ import annotations

import asyncio
import time
import logging

import numpy as np
import redis.asyncio as redis
from prometheus_client import REGISTRY

from services.cli.mesh import free_port
from services.embedding.cache import CachedVector, L1Cache, L2Cache, cache_key, normalise_text
from tests.conftest import REDIS_URL

DIM = 384


def vec(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def redis_errors() -> float:
    return REGISTRY.get_sample_value("ragfleet_embedding_redis_errors_total") or 0.0


def test_key_depends_on_model_input_type_and_normalised_text():
    assert normalise_text("  Hello \n\t world ") == "Hello world"
    base = cache_key("m", 1, normalise_text("Hello   world"))
    assert base == cache_key("m", 1, normalise_text(" Hello world "))
    assert base != cache_key("m2", 1, "Hello world")
    assert base != cache_key("m", 2, "Hello world")
    assert base != cache_key("m", 1, "hello world")


def test_l1_is_bounded_by_bytes_and_evicts_least_recently_used():
    one = CachedVector(vec(0), 5, False)
    size = one.vector.nbytes + 200
    l1 = L1Cache(max_bytes=3 * size, ttl=60)
    for key in "abc":
        l1.put(key, one)
    assert l1.get("a") is not None  # a is now the most recently used
    l1.put("d", one)
    assert l1.get("b") is None and l1.get("a") is not None and l1.get("d") is not None
    assert l1.bytes <= l1.max_bytes and len(l1) == 3


async def test_l1_entries_expire():
    l1 = L1Cache(max_bytes=1 << 20, ttl=0.05)
    l1.put("k", CachedVector(vec(1), 3, False))
    assert l1.get("k") is not None
    await asyncio.sleep(0.08)
    assert l1.get("k") is None and l1.bytes == 0


async def test_l2_round_trip_as_raw_float32_with_ttl(redis_cleanup):
    prefix = redis_cleanup
    l2 = L2Cache(REDIS_URL, prefix=prefix, ttl_seconds=120, timeout=0.5, dimension=DIM)
    try:
        await l2.put_many([("k1", vec(1)), ("k2", vec(2))])
        got = await l2.get_many(["k1", "missing", "k2"])
        np.testing.assert_array_equal(got[0], vec(1))
        assert got[1] is None
        np.testing.assert_array_equal(got[2], vec(2))
        raw = redis.Redis.from_url(REDIS_URL)
        assert await raw.get(prefix + "k1") == vec(1).tobytes()  # raw float32 bytes, nothing else
        assert 0 < await raw.ttl(prefix + "k1") <= 120
        await raw.set(prefix + "bad", b"\x00" * 12)  # wrong size: treated as a miss, never as a vector
        assert (await l2.get_many(["bad"])) == [None]
        await raw.aclose()
    finally:
        await l2.close()


async def test_l2_on_a_closed_port_is_a_miss_logged_once_and_counted(caplog):
    l2 = L2Cache(f"redis://127.0.0.1:{free_port()}/0", prefix="x:", ttl_seconds=60, timeout=0.2, dimension=DIM)
    before = redis_errors()
    with caplog.at_level(logging.WARNING, logger="ragfleet.embedding.cache"):
        assert await l2.get_many(["a", "b"]) == [None, None]
        await l2.put_many([("a", vec(0))])  # skipped during the back-off, no error, no delay
        l2._retry_at = 0  # back-off over: the next call tries Redis again and fails again
        assert await l2.get_many(["a"]) == [None]
    await l2.close()
    assert redis_errors() - before == 2
    assert len([r for r in caplog.records if "redis" in r.getMessage()]) == 1


class RedisProxy:
    """A TCP forwarder to the real Redis that can go down (listener and open connections closed) and come back."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._sockets: list[asyncio.StreamWriter] = []

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def down(self) -> None:
        self._server.close()
        for writer in self._sockets:
            writer.close()
        self._sockets.clear()
        await self._server.wait_closed()

    async def _forward(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self._sockets += [client_writer, server_writer]
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    @staticmethod
    async def _pipe(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def test_l2_reconnects_by_itself_when_redis_comes_back(redis_cleanup):
    """A TCP forwarder stands in for Redis going down and coming back on the same address."""
    proxy = RedisProxy()
    l2 = L2Cache(f"redis://127.0.0.1:{proxy.port}/0", prefix=redis_cleanup, ttl_seconds=60, timeout=0.2, dimension=DIM)
    try:
        assert await l2.get_many(["k"]) == [None]  # nothing listens: a miss, not an error
        assert not l2.available
        await proxy.up()
        await asyncio.sleep(0.6)  # the first back-off is 0.5 s
        await l2.put_many([("k", vec(7))])
        got = await l2.get_many(["k"])
        np.testing.assert_array_equal(got[0], vec(7))
        assert l2.available
    finally:
        await l2.close()
        await proxy.down()


async def test_l2_burst_beyond_the_connection_pool_waits_and_hits(redis_cleanup, caplog):
    """100 concurrent requests share a pool of 32 connections: they wait their turn, none reads as an outage."""
    l2 = L2Cache(REDIS_URL, prefix=redis_cleanup, ttl_seconds=60, timeout=0.5, dimension=DIM)
    try:
        await l2.put_many([(f"k{i}", vec(i)) for i in range(100)])
        before = redis_errors()
        with caplog.at_level(logging.WARNING, logger="ragfleet.embedding.cache"):
            got = await asyncio.gather(*(l2.get_many([f"k{i}"]) for i in range(100)))
        assert sum(g[0] is None for g in got) == 0  # every stored key is a hit
        np.testing.assert_array_equal(got[57][0], vec(57))
        assert redis_errors() == before and l2.available
        assert not caplog.records
    finally:
        await l2.close()


async def test_concurrent_failures_back_off_once_not_once_each(redis_cleanup):
    """20 requests failing together are one failure: L2 is back ~0.5 s after Redis, not after the 10 s maximum.
    A failed probe doubles the back-off once, however many requests probed together."""
    proxy = RedisProxy()
    await proxy.up()
    l2 = L2Cache(f"redis://127.0.0.1:{proxy.port}/0", prefix=redis_cleanup, ttl_seconds=60, timeout=0.2,
                 dimension=DIM)
    try:
        await asyncio.gather(*(l2.put_many([(f"k{i}", vec(i))]) for i in range(20)))  # several pooled connections
        await proxy.down()
        before = redis_errors()
        assert await asyncio.gather(*(l2.get_many(["k1"]) for _ in range(20))) == [[None]] * 20
        assert redis_errors() - before == 20 and not l2.available
        await asyncio.sleep(0.55)  # the first back-off (0.5 s) is over; Redis is still down
        assert l2.available
        assert await asyncio.gather(*(l2.get_many(["k1"]) for _ in range(20))) == [[None]] * 20
        await proxy.up()
        await asyncio.sleep(0.5)
        assert (await l2.get_many(["k1"]))[0] is None and not l2.available  # the failed probe doubled it: 1 s
        # Back within ~1 s of the failed probe (once doubled), not the 10 s of a back-off doubled per request; poll
        # rather than sleep a fixed 0.55 s, which a loaded CI machine overran by a few ms once.
        deadline = time.monotonic() + 2.0
        while not l2.available and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert l2.available
        np.testing.assert_array_equal((await l2.get_many(["k1"]))[0], vec(1))
    finally:
        await l2.close()
        await proxy.down()
