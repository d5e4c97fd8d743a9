"""The OpenAI-compatible backend against a real HTTP server speaking the embeddings protocol (sim_llm, and sim_llm
with a context limit)."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from services.cli.sim_llm import SimConfig, SimLLM, start
from services.embedding.backends.remote import REMOTE_MAX_TOKENS, RemoteEmbeddingBackend
from services.embedding.batcher import Batcher
from services.embedding.config import BatcherConfig, OpenAIConfig
from services.embedding.embedder import Embedder
from services.runtime.errors import InvalidArgument, Unavailable

QUERY = 1


class ContextLimitedSim(SimLLM):
    """sim_llm with a context limit, as real endpoints have: a word is a token and so is each CJK character; one
    text over the limit gets OpenAI's 400 for the whole call. Records the texts of every call, refused or not."""

    def __init__(self, config: SimConfig, max_tokens: int = REMOTE_MAX_TOKENS) -> None:
        super().__init__(config)
        self.max_tokens = max_tokens
        self.calls: list[list[str]] = []

    async def embeddings(self, request: web.Request) -> web.Response:
        inputs = (await request.json())["input"]
        self.calls.append(inputs)
        longest = max(map(self.tokens, inputs))
        if longest > self.max_tokens:
            message = (f"This model's maximum context length is {self.max_tokens} tokens, however you requested "
                       f"{longest} tokens. Please reduce your prompt.")
            return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        return await super().embeddings(request)

    @staticmethod
    def tokens(text: str) -> int:
        spaced = "".join(f" {c} " if "\u4e00" <= c <= "\u9fff" else c for c in text)
        return len(spaced.split())


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


@pytest.fixture
async def limited_sim():
    sim = ContextLimitedSim(SimConfig(embedding_call_ms=2, embedding_per_text_ms=0.1, seed=3))
    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1", sim
    await runner.cleanup()


def backend_for(url: str, **overrides) -> RemoteEmbeddingBackend:
    settings = {"base_url": url, "model": "sim-embed", "dimension": 384, "timeout_seconds": 2.0,
                "max_retries": 2, "max_batch_size": 16} | overrides
    return RemoteEmbeddingBackend(OpenAIConfig(**settings))


def embedder_for(backend: RemoteEmbeddingBackend, *, truncate: bool) -> Embedder:
    batcher = Batcher(backend, BatcherConfig())
    batcher.start()
    return Embedder(backend, batcher, None, None, truncate=truncate)


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


def test_prepare_flags_and_cuts_texts_over_the_limit_counting_characters():
    backend = backend_for("http://127.0.0.1:9/v1")
    cjk, english, short = backend.prepare(["漢" * 9000, "word " * 2000, "a short query"])
    assert cjk.truncated and cjk.text == "漢" * REMOTE_MAX_TOKENS  # ~1 token per CJK character: 9000 tokens
    assert english.truncated and len(english.text) == REMOTE_MAX_TOKENS  # a character is counted as up to a token
    assert not short.truncated and short.text == "a short query"


async def test_over_limit_text_is_rejected_or_truncated_before_the_endpoint_sees_it(limited_sim):
    url, sim = limited_sim
    backend = backend_for(url)
    strict, lenient = embedder_for(backend, truncate=False), embedder_for(backend, truncate=True)
    too_long = "漢" * 9000
    innocent, refused = await asyncio.gather(strict.embed(["an innocent short query"], QUERY),
                                             strict.embed([too_long], QUERY), return_exceptions=True)
    assert isinstance(refused, InvalidArgument) and "limit of 8191 characters" in refused.message
    np.testing.assert_allclose(innocent.items[0].vector, sim._vector("an innocent short query"), atol=1e-6)
    assert sim.calls == [["an innocent short query"]]  # the over-long text never shared (and failed) its call
    cut = (await lenient.embed([too_long], QUERY)).items[0]
    assert cut.truncated
    np.testing.assert_allclose(cut.vector, sim._vector("漢" * REMOTE_MAX_TOKENS), atol=1e-6)
    await strict.batcher.close()
    await lenient.close()


async def test_endpoint_refusal_is_invalid_argument_and_spares_its_batch_neighbours(limited_sim):
    url, sim = limited_sim
    sim.max_tokens = 50  # a smaller model than our limit assumes: the text passes prepare, the endpoint refuses it
    backend = backend_for(url)
    bad = "word " * 60
    with pytest.raises(InvalidArgument, match="HTTP 400.*maximum context length is 50 tokens"):
        await backend.embed(backend.prepare([bad]))
    assert len(sim.calls) == 1  # refused input is not retried
    sim.calls.clear()
    embedder = embedder_for(backend, truncate=True)
    texts = [f"neighbour query {i}" for i in range(7)] + [bad]
    results = await asyncio.gather(*(embedder.embed([t], QUERY) for t in texts), return_exceptions=True)
    assert isinstance(results[-1], InvalidArgument) and "maximum context length is 50 tokens" in results[-1].message
    for text, result in zip(texts[:-1], results):
        np.testing.assert_allclose(result.items[0].vector, sim._vector(text), atol=1e-6)
    assert len(sim.calls[0]) == 8  # all eight shared one call, which the endpoint refused
    assert len(sim.calls) == 1 + 2 * 3  # then halves until the bad text was alone: ~2 calls per halving
    await embedder.close()


async def test_endpoint_configuration_errors_stay_unavailable(limited_sim):
    # A 404 (wrong base URL or model) is our setup, not the caller's text: it must not read as INVALID_ARGUMENT.
    url, _ = limited_sim
    backend = backend_for(url.removesuffix("/v1") + "/wrong")
    with pytest.raises(Unavailable, match="404"):
        await backend.embed(backend.prepare(["x"]))
    await backend.close()


async def test_backends_with_the_same_settings_share_one_client(sim):
    url, _ = sim
    first, second = backend_for(url), backend_for(url)
    assert first._client is second._client  # one HTTP connection pool per process, not one per backend
    await first.embed(first.prepare(["x"]))
    await second.embed(second.prepare(["y"]))
    await first.close()


async def test_retries_are_spaced_by_capped_jittered_backoff(sim, monkeypatch):
    from services.embedding.backends import remote

    url, control = sim
    await control(failure_rate=1.0)
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        delays.append(delay)
        await real_sleep(delay)

    # Only the backend's own reference to asyncio: the loop, aiohttp and the sim keep the real one.
    monkeypatch.setattr(remote, "asyncio", type("asyncio", (), {"sleep": staticmethod(recording_sleep)}))
    backend = backend_for(url, max_retries=3)
    with pytest.raises(Unavailable):
        await backend.embed(backend.prepare(["x"]))
    assert (await control())["failures_injected"] == 4  # one call + three retries, then give up
    assert len(delays) == 3
    policy = backend.retry
    for attempt, delay in enumerate(delays):
        assert 0 <= delay <= min(policy.max_delay, policy.base_delay * 2 ** attempt)
    samples = [policy.backoff(11) for _ in range(200)]
    assert max(samples) <= policy.max_delay and len(set(samples)) > 100  # capped, and jittered
    await backend.close()
