"""The OpenAI-compatible backend against a real HTTP server speaking the embeddings protocol (sim_llm)."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import numpy as np
import pytest

from services.cli.sim_llm import SimConfig, start
from services.embedding.backends.remote import RemoteEmbeddingBackend
from services.embedding.batcher import Batcher
from services.embedding.config import BatcherConfig, OpenAIConfig
from services.runtime.errors import Unavailable


@pytest.fixture
async def sim():
    runner, port = await start(SimConfig(embedding_call_ms=5, embedding_per_text_ms=0.1, seed=3))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:

        async def control(**changes):
            if changes:
                async with http.post(f"{base}/_sim/config", json=changes) as response:
                    assert response.status == 200
            async with http.get(f"{base}/_sim/stats") as response:
                return await response.json()

        yield base + "/v1", control
    await runner.cleanup()


def backend_for(url: str, **overrides) -> RemoteEmbeddingBackend:
    settings = {"base_url": url, "model": "sim-embed", "dimension": 384, "timeout_seconds": 2.0,
                "max_retries": 2, "max_batch_size": 16} | overrides
    return RemoteEmbeddingBackend(OpenAIConfig(**settings))


async def test_vectors_in_order_normalised_and_checked(sim):
    url, control = sim
    backend = backend_for(url)
    texts = ["first", "second", "third"]
    vectors = await backend.embed(backend.prepare(texts))
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = await backend.embed(backend.prepare(["second"]))
    np.testing.assert_allclose(vectors[1], alone[0], atol=1e-6)
    await backend.close()


async def test_wrong_dimension_is_an_error_naming_the_setting(sim):
    url, _ = sim
    backend = backend_for(url, dimension=768)
    with pytest.raises(Unavailable, match="dimension 384; expected 768"):
        await backend.embed(backend.prepare(["x"]))
    await backend.close()


async def test_transient_failures_are_retried_a_bounded_number_of_times(sim):
    url, control = sim
    await control(failure_rate=1.0)
    backend = backend_for(url, max_retries=2)
    with pytest.raises(Unavailable, match="embedding endpoint"):
        await backend.embed(backend.prepare(["x"]))
    stats = await control()
    assert stats["failures_injected"] == 3  # one call + two retries, then give up
    await control(failure_rate=0.5)
    backend = backend_for(url, max_retries=6)
    for i in range(5):
        assert (await backend.embed(backend.prepare([f"y{i}"]))).shape == (1, 384)
    await backend.close()


async def test_a_hanging_endpoint_times_out(sim):
    url, control = sim
    await control(hang_rate=1.0)
    backend = backend_for(url, timeout_seconds=0.2, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(Unavailable):
        await backend.embed(backend.prepare(["x"]))
    assert time.perf_counter() - started < 1.5
    await backend.close()


async def test_batcher_merges_callers_into_calls_within_the_batch_limit(sim):
    url, control = sim
    backend = backend_for(url, max_batch_size=16, max_in_flight=1)
    batcher = Batcher(backend, BatcherConfig(max_batch_size=64))
    batcher.start()

    async def caller(i: int) -> np.ndarray:
        (future,) = batcher.append(backend.prepare([f"caller {i}"]))
        return (await future).vector

    vectors = await asyncio.gather(*(caller(i) for i in range(64)))
    stats = await control()
    assert stats["embedding_inputs"] == 64
    assert stats["max_embedding_batch"] == 16  # merged, and never above the backend's limit
    assert stats["embedding_requests"] <= 8
    for i in (0, 31, 63):
        np.testing.assert_allclose(vectors[i], (await backend.embed(backend.prepare([f"caller {i}"])))[0],
                                   atol=1e-6)
    await batcher.close()
    await backend.close()


def test_base64_and_float_list_answers_decode_to_the_same_vectors():
    # We ask for base64; a server that ignores encoding_format answers with float lists, which must work too.
    backend = backend_for("http://127.0.0.1:9/v1", dimension=3)
    rows = np.array([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], dtype=np.float32)
    as_base64 = {"data": [{"index": i, "embedding": base64.b64encode(r.tobytes()).decode()} for i, r in enumerate(rows)]}
    as_lists = {"data": [{"index": i, "embedding": r.tolist()} for i, r in reversed(list(enumerate(rows)))]}
    expected = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_allclose(backend._check(as_base64, 2), expected, atol=1e-6)
    np.testing.assert_allclose(backend._check(as_lists, 2), expected, atol=1e-6)  # sorted back into input order
    with pytest.raises(Unavailable, match="2 vectors for 3 texts"):
        backend._check(as_lists, 3)
