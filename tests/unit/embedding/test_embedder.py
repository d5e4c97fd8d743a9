"""The pipeline: L1 then L2 then single-flight then the batcher; Redis trouble never fails a request."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from services.cli.mesh import free_port
from services.embedding.batcher import Batcher
from tests.unit.embedding.conftest import ScriptedBackend
from services.embedding.cache import L1Cache, L2Cache
from services.embedding.config import BatcherConfig
from services.embedding.embedder import Embedder
from services.runtime.errors import InvalidArgument, Unavailable
from tests.conftest import REDIS_URL

QUERY, DOCUMENT = 1, 2


def make_embedder(backend, *, l2: L2Cache | None = None, l1: bool = True, truncate: bool = True,
                  config: BatcherConfig | None = None) -> Embedder:
    batcher = Batcher(backend, config or BatcherConfig(max_batch_size=32))
    batcher.start()
    return Embedder(backend, batcher, L1Cache(1 << 22, 60) if l1 else None, l2, truncate=truncate)


def l2_for(prefix: str, dim: int, url: str = REDIS_URL) -> L2Cache:
    return L2Cache(url, prefix=prefix, ttl_seconds=60, timeout=0.2, dimension=dim)


async def test_vectors_in_request_order_and_l1_hits(scripted, text_vector):
    embedder = make_embedder(scripted)
    first = await embedder.embed(["alpha", "beta gamma"], QUERY)
    assert [i.cached for i in first.items] == [False, False]
    np.testing.assert_array_equal(first.items[1].vector, text_vector("beta gamma"))
    assert first.items[1].token_count == 2
    again = await embedder.embed(["beta   gamma", "alpha", "delta"], QUERY)
    assert [i.cached for i in again.items] == [True, True, False]
    assert again.l1_hits == 2 and scripted.texts_embedded == 3
    np.testing.assert_array_equal(again.items[0].vector, text_vector("beta gamma"))
    other_type = await embedder.embed(["alpha"], DOCUMENT)  # another input type is another cache entry
    assert not other_type.items[0].cached
    await embedder.close()


async def test_duplicates_in_one_request_are_computed_once(scripted):
    embedder = make_embedder(scripted, l1=False)
    result = await embedder.embed(["same", "other", "same", " same "], QUERY)
    assert scripted.texts_embedded == 2
    assert [i.vector.tolist() for i in result.items][0] == result.items[2].vector.tolist()
    await embedder.close()


async def test_concurrent_requests_for_the_same_text_share_one_computation(scripted):
    scripted.delay = 0.02
    embedder = make_embedder(scripted, l1=False)
    results = await asyncio.gather(*(embedder.embed(["hot query", f"own {i}"], QUERY) for i in range(10)))
    assert sum(t == "hot query" for b in scripted.batches for t in b) == 1
    assert sum(r.joined for r in results) == 9
    assert len({r.items[0].vector.tobytes() for r in results}) == 1
    await embedder.close()


async def test_bypass_cache_recomputes_but_still_writes(scripted):
    embedder = make_embedder(scripted)
    await embedder.embed(["x"], QUERY)
    bypass = await embedder.embed(["x"], QUERY, bypass_cache=True)
    assert not bypass.items[0].cached and scripted.texts_embedded == 2
    assert (await embedder.embed(["x"], QUERY)).items[0].cached
    await embedder.close()


async def test_cancelled_request_drops_its_queued_texts(scripted):
    gate = scripted.gate = asyncio.Event()
    embedder = make_embedder(scripted, l1=False)
    blocker = asyncio.create_task(embedder.embed(["occupies the model"], QUERY))
    await asyncio.sleep(0.01)
    doomed = asyncio.create_task(embedder.embed(["never run 1", "never run 2"], QUERY))
    shared = asyncio.create_task(embedder.embed(["kept alive"], QUERY))
    joiner_of_doomed = asyncio.create_task(embedder.embed(["kept alive"], QUERY))
    await asyncio.sleep(0.01)
    assert embedder.batcher.depth == 3
    doomed.cancel()
    shared.cancel()  # "kept alive" still has a waiter, so it must still be computed
    await asyncio.sleep(0.01)
    assert embedder.batcher.depth == 1
    gate.set()
    await blocker
    assert not (await joiner_of_doomed).items[0].cached
    ran = {t for b in scripted.batches for t in b}
    assert "kept alive" in ran and not ran & {"never run 1", "never run 2"}
    await embedder.close()


async def test_request_arriving_as_a_flight_is_cancelled_gets_its_own_computation(scripted, text_vector):
    gate = scripted.gate = asyncio.Event()
    embedder = make_embedder(scripted)
    blocker = asyncio.create_task(embedder.embed(["occupies the model"], QUERY))
    await asyncio.sleep(0.01)
    abandoned = asyncio.create_task(embedder.embed(["hot"], QUERY))
    await asyncio.sleep(0.01)
    # In one loop step: A's RPC is cancelled (cancelling its flight) and B asks for the same text. B runs before
    # the flight's done-callbacks, so it must not join the cancelled flight.
    abandoned.cancel()
    healthy = asyncio.create_task(embedder.embed(["hot"], QUERY))
    await asyncio.sleep(0.01)
    gate.set()
    await blocker
    result = await healthy
    np.testing.assert_array_equal(result.items[0].vector, text_vector("hot"))
    assert result.computed == 1 and result.joined == 0
    assert abandoned.cancelled() and scripted.batches == [["occupies the model"], ["hot"]]
    await embedder.close()


async def test_request_arriving_as_a_flight_fails_gets_its_text_tried(text_vector):
    class FailsFirstCall(ScriptedBackend):
        def __init__(self) -> None:
            super().__init__()
            self.failing = asyncio.Event()

        async def embed(self, items):
            if not self.failing.is_set():
                self.batches.append([i.text for i in items])
                # Wakes B now: its step runs after A's flight has failed but before the flight's done-callbacks.
                self.failing.set()
                raise Unavailable("model crashed")
            return await super().embed(items)

    backend = FailsFirstCall()
    embedder = make_embedder(backend)

    async def arrives_as_the_first_call_fails():
        await backend.failing.wait()
        return await embedder.embed(["hot"], QUERY)

    late = asyncio.create_task(arrives_as_the_first_call_fails())
    with pytest.raises(Unavailable):
        await embedder.embed(["hot"], QUERY)
    result = await late
    np.testing.assert_array_equal(result.items[0].vector, text_vector("hot"))
    assert backend.batches == [["hot"], ["hot"]]  # B's text was tried, not failed with A's error
    await embedder.close()


async def test_l1_keeps_compact_vectors_not_views_of_batch_matrices(float32_backend):
    # float32: its batches come back as one (batch, dim) matrix (int8 answers each text as it is done).
    batcher = Batcher(float32_backend, BatcherConfig(max_batch_size=32))
    batcher.start()
    embedder = Embedder(float32_backend, batcher, L1Cache(1 << 22, 60), None)
    results = await asyncio.gather(*(embedder.embed([f"query number {i}"], QUERY) for i in range(32)))
    assert max(r.max_batch_size for r in results) > 1  # the vectors came out of shared (batch, dim) matrices
    cached = [embedder.l1.get(key).vector for key in list(embedder.l1._entries)]
    assert len(cached) == 32
    for vector in cached:
        # L1 counts vector.nbytes: a row view would pin its whole batch matrix behind that count.
        assert vector.base is None or vector.base.nbytes == vector.nbytes
    await batcher.close()  # not embedder.close(): the ONNX backend is shared by the session


async def test_l2_hit_is_promoted_to_l1_and_shared_across_replicas(scripted, redis_cleanup):
    replica_a = make_embedder(scripted, l2=l2_for(redis_cleanup, scripted.dimension))
    await replica_a.embed(["shared text"], QUERY)
    replica_b = make_embedder(scripted, l2=l2_for(redis_cleanup, scripted.dimension))
    from_l2 = await replica_b.embed(["shared text"], QUERY)
    assert from_l2.l2_hits == 1 and from_l2.items[0].cached and from_l2.items[0].token_count == 2
    assert scripted.texts_embedded == 1
    from_l1 = await replica_b.embed(["shared text"], QUERY)
    assert from_l1.l1_hits == 1 and from_l1.l2_hits == 0
    await replica_a.close()
    await replica_b.close()


async def test_redis_unreachable_never_fails_a_request(scripted):
    embedder = make_embedder(scripted, l2=l2_for("x:", scripted.dimension, f"redis://127.0.0.1:{free_port()}/0"))
    results = await asyncio.gather(*(embedder.embed([f"t{i}", "common"], QUERY) for i in range(50)))
    assert all(len(r.items) == 2 for r in results)
    assert (await embedder.embed(["t3"], QUERY)).items[0].cached  # L1 still serves
    await embedder.close()


async def test_over_limit_text_rejected_when_truncation_is_off(scripted):
    embedder = make_embedder(scripted, truncate=False)
    with pytest.raises(InvalidArgument, match="256 tokens"):
        await embedder.embed(["fine", "word " * 300], QUERY)
    assert scripted.texts_embedded == 0
    await embedder.close()
    lenient = make_embedder(scripted)
    result = await lenient.embed(["word " * 300], QUERY)
    assert result.items[0].truncated and result.items[0].token_count == 256
    await lenient.close()


async def test_prewarm_fills_the_cache(scripted, tmp_path):
    path = tmp_path / "common.txt"
    path.write_text("what is covid\n\nhow do vaccines work\n")
    embedder = make_embedder(scripted)
    assert await embedder.prewarm(path, QUERY) == 2
    assert (await embedder.embed(["what is covid"], QUERY)).items[0].cached
    await embedder.close()


def long_texts(count: int, chars: int) -> list[str]:
    """Distinct texts of `chars` characters cut from the SciFact abstracts (up to the service's 100,000 limit)."""
    from tests.unit.embedding.conftest import SCIFACT

    with SCIFACT.open() as handle:
        corpus = " ".join(json.loads(line)["text"] for line, _ in zip(handle, range(400)))
    return [f"{i} " + corpus[i * 97:i * 97 + chars] for i in range(count)]


async def test_a_large_request_is_tokenized_without_stalling_the_event_loop(onnx_backend):
    texts = long_texts(8, 99_990)
    started = time.perf_counter()
    onnx_backend.prepare(texts)
    tokenizing = time.perf_counter() - started  # what the loop would stall for if tokenizing ran on it
    batcher = Batcher(onnx_backend, BatcherConfig(max_batch_size=32))
    batcher.start()
    embedder = Embedder(onnx_backend, batcher, None, None)
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            tick = time.perf_counter()
            await asyncio.sleep(0.002)
            lags.append(time.perf_counter() - tick - 0.002)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        result = await embedder.embed(texts, QUERY)
    finally:
        ticking.cancel()
        await batcher.close()  # not embedder.close(): the ONNX backend is shared by the session
    assert all(item.truncated and item.token_count == 256 for item in result.items)
    assert tokenizing > 0.1, tokenizing
    assert max(lags) < tokenizing / 4, f"loop stalled {max(lags):.3f} s; tokenizing takes {tokenizing:.3f} s"


class CountingL2(L2Cache):
    """The real L2 on Redis, recording the keys of every SET it sends."""

    def __init__(self, prefix: str, dim: int) -> None:
        super().__init__(REDIS_URL, prefix=prefix, ttl_seconds=60, timeout=0.2, dimension=dim)
        self.written: list[str] = []

    async def put_many(self, items):
        self.written += [key for key, _ in items]
        await super().put_many(items)


async def test_a_text_computed_once_is_written_to_l2_once(scripted, redis_cleanup, text_vector):
    scripted.delay = 0.02
    l2 = CountingL2(redis_cleanup, scripted.dimension)
    embedder = make_embedder(scripted, l2=l2, l1=False)
    results = await asyncio.gather(embedder.embed(["hot query", "own a"], QUERY),
                                   embedder.embed(["hot query", "own b"], QUERY))
    assert sum(r.joined for r in results) == 1  # the second request joined the first one's computation
    assert len(l2.written) == 3 and len(set(l2.written)) == 3  # hot query SET once, not once per request
    replica = make_embedder(scripted, l2=l2_for(redis_cleanup, scripted.dimension), l1=False)
    again = await replica.embed(["hot query", "own a", "own b"], QUERY)
    assert again.l2_hits == 3  # every text did reach Redis
    np.testing.assert_array_equal(again.items[0].vector, text_vector("hot query"))
    await embedder.close()
    await replica.close()


async def test_a_joiner_writes_l2_when_the_request_that_started_the_computation_is_cancelled(scripted,
                                                                                            redis_cleanup):
    gate = scripted.gate = asyncio.Event()
    l2 = CountingL2(redis_cleanup, scripted.dimension)
    embedder = make_embedder(scripted, l2=l2, l1=False)
    starter = asyncio.create_task(embedder.embed(["hot query"], QUERY))
    await asyncio.sleep(0.01)
    joiner = asyncio.create_task(embedder.embed(["hot query"], QUERY))
    await asyncio.sleep(0.01)
    starter.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    assert (await joiner).joined == 1
    assert len(l2.written) == 1  # the vector still reaches the shared cache
    await embedder.close()
