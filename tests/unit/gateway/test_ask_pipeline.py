"""AskPipeline with fakes passed in through the client interfaces: branch cancellation on a cache hit, stream
closing reaching generation, concurrency of the fan-out (variants; history ∥ embedding), validation before the first
event, per-hop timeouts cut to the client's deadline, the exported cache outcomes and hit ratio, semantic hits only
for the same request fingerprint, and Redis writes after the answer bounded by their stage budgets (hung real
Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.gateway.ask import AskPipeline
from services.gateway.config import AskLimits, CacheConfig, ConversationConfig, StageBudgets
from services.gateway.conversations import ConversationStore
from services.gateway.deadlines import Deadline
from services.gateway.response_cache import ResponseCache
from services.runtime.errors import DeadlineExceeded, InvalidArgument
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, gateway_pb2, generation_pb2,
                                             retrieval_pb2)
from tests.conftest import REDIS_URL


class FakeEmbedding:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.cancelled = False
        self.timeouts: list[float] = []

    async def embed(self, texts, *, input_type, timeout):
        self.calls += 1
        self.timeouts.append(timeout)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return embedding_pb2.EmbedResponse(embeddings=[embedding_pb2.Embedding(values=[1.0, 0.0]) for _ in texts])


class FakeRetrieval:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.queries: list[str] = []
        self.timeouts: list[float] = []

    async def search(self, request, *, timeout):
        self.queries.append(request.query_text)
        self.timeouts.append(timeout)
        await asyncio.sleep(self.delay)
        hits = [retrieval_pb2.SearchHit(chunk_id=f"{request.query_text[:3]}#{i}", doc_id="d", text=f"t{i}",
                                        score=1.0 - i / 10) for i in range(request.top_k)]
        return retrieval_pb2.SearchResponse(hits=hits, timings_ms={"rerank": 1.5})


class FakeGeneration:
    def __init__(self, tokens: int = 5, delay: float = 0.0) -> None:
        self.tokens = tokens
        self.delay = delay
        self.calls = 0
        self.closed = 0
        self.requests: list[generation_pb2.GenerateRequest] = []
        self.timeouts: list[float] = []

    async def generate_stream(self, request, *, timeout):
        self.calls += 1
        self.timeouts.append(timeout)
        self.requests.append(request)
        try:
            for i in range(self.tokens):
                await asyncio.sleep(self.delay)
                yield generation_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=f"w{i} "))
            yield generation_pb2.GenerateResponse(finished=generation_pb2.GenerationFinished(
                finish_reason=common_pb2.FINISH_REASON_STOP, model="fake",
                usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=self.tokens, total_tokens=3 + self.tokens)))
        finally:
            self.closed += 1


def make(*, embedding=None, retrieval=None, generation=None, limits=AskLimits(), cache=None, conversations=None,
         budgets=StageBudgets()):
    return AskPipeline(embedding=embedding or FakeEmbedding(), retrieval=retrieval or FakeRetrieval(),
                       generation=generation or FakeGeneration(),
                       cache=cache or ResponseCache(CacheConfig(redis_prefix="u:"), None),
                       conversations=conversations or ConversationStore(ConversationConfig(), None, prefix="u:"),
                       limits=limits, budgets=budgets)


async def run(pipeline: AskPipeline, deadline: Deadline | None = None, **fields) -> list[gateway_pb2.AskResponse]:
    request = gateway_pb2.AskRequest(**fields)
    plan = pipeline.plan("t", request)
    return [e async for e in pipeline.stream("t", request, plan, deadline or Deadline(None))]


async def test_stream_then_hot_hit_replays_without_embedding():
    generation = FakeGeneration()
    pipeline = make(generation=generation)
    first = await run(pipeline, question="Q?")
    assert [e.WhichOneof("event") for e in first] == ["sources"] + ["delta"] * 5 + ["finished"]
    assert first[-1].finished.timings.rerank_ms == 1.5
    slow = FakeEmbedding(delay=5.0)
    pipeline.embedding = slow
    started = time.perf_counter()
    second = await run(pipeline, question="q")
    assert time.perf_counter() - started < 1.0 and slow.calls == 0, "an L1-hot hit never starts the embedding"
    assert second[-1].finished.cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT
    assert "".join(e.delta.text for e in second if e.HasField("delta")) == "w0 w1 w2 w3 w4 "
    assert generation.calls == 1 and second[-1].finished.usage.total_tokens == 0


async def test_hit_from_another_replica_cancels_the_embedding_branch():
    prefix = f"ragfleet-test:{uuid.uuid4().hex}:"
    client = aioredis.from_url(REDIS_URL)
    config = CacheConfig(redis_prefix=prefix, corpus_version_key=prefix + "version:{tenant}")
    try:
        replica_a = make(cache=ResponseCache(config, client))
        await run(replica_a, question="Q?")
        await replica_a.cache.flush()  # its Redis copy is written in the background, after AskFinished
        slow = FakeEmbedding(delay=5.0)
        generation = FakeGeneration()
        replica_b = make(embedding=slow, generation=generation, cache=ResponseCache(config, client))
        started = time.perf_counter()
        events = await run(replica_b, question="q")
        assert time.perf_counter() - started < 1.0 and slow.calls == 1 and slow.cancelled, \
            "cache || embed run together when L1 is cold, and the hit cancels the embedding"
        assert events[-1].finished.cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT and generation.calls == 0
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_closing_the_stream_closes_generation():
    generation = FakeGeneration(tokens=100, delay=0.01)
    pipeline = make(generation=generation)
    request = gateway_pb2.AskRequest(question="long", bypass_cache=True)
    stream = pipeline.stream("t", request, pipeline.plan("t", request), Deadline(None))
    assert (await anext(stream)).HasField("sources")
    assert (await anext(stream)).HasField("delta")
    await stream.aclose()  # what grpc does when the client cancels
    assert generation.closed == 1


async def test_variants_are_searched_concurrently_and_fused():
    retrieval = FakeRetrieval(delay=0.2)
    pipeline = make(retrieval=retrieval, limits=AskLimits(query_variants=2))
    started = time.perf_counter()
    events = await run(pipeline, question="What is the boiling point of water?", top_k=3, bypass_cache=True)
    assert time.perf_counter() - started < 0.35, "two 200 ms searches must overlap"
    assert retrieval.queries == ["What is the boiling point of water?", "boiling point water"]
    passages = events[0].sources.passages
    assert [p.number for p in passages] == [1, 2, 3] and len({p.chunk_id for p in passages}) == 3


async def test_sequential_fanout_is_the_sum():
    pipeline = make(embedding=FakeEmbedding(delay=0.1), retrieval=FakeRetrieval(delay=0.1),
                    limits=AskLimits(query_variants=2, parallel_fanout=False))
    started = time.perf_counter()
    await run(pipeline, question="What is the boiling point of water?", bypass_cache=True)
    assert time.perf_counter() - started >= 0.3


async def test_history_is_sent_and_follow_ups_bypass_the_cache():
    generation = FakeGeneration()
    pipeline = make(generation=generation)
    await run(pipeline, question="first?", conversation_id="c")
    events = await run(pipeline, question="second?", conversation_id="c")
    assert [t.content for t in generation.requests[-1].history] == ["first?", "w0 w1 w2 w3 w4 "]
    assert events[-1].finished.cache_status == gateway_pb2.CACHE_STATUS_BYPASS
    assert events[-1].finished.conversation_id == "c"


@pytest.mark.parametrize("fields, message", [
    ({"question": ""}, "question"), ({"question": "q", "top_k": 51}, "between 1 and 50"),
    ({"question": "q", "conversation_id": "c" * 200}, "conversation_id"),
    ({"question": "q", "filters": [common_pb2.FieldCondition()]}, "filters[0].field"),
    ({"question": "q", "params": common_pb2.GenerationParams(temperature=3)}, "params.temperature"),
])
def test_plan_rejects_bad_input(fields, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[")):
        make().plan("t", gateway_pb2.AskRequest(**fields))


async def test_spent_deadline_fails_before_calling_upstreams():
    embedding = FakeEmbedding()
    with pytest.raises(DeadlineExceeded):
        await run(make(embedding=embedding), Deadline(0.0), question="q", bypass_cache=True)
    assert embedding.calls == 0


async def test_each_hop_gets_its_stage_budget_cut_to_what_is_left_of_the_deadline():
    embedding, retrieval, generation = FakeEmbedding(delay=0.1), FakeRetrieval(), FakeGeneration()
    pipeline = make(embedding=embedding, retrieval=retrieval, generation=generation,
                    budgets=StageBudgets(retrieve=0.1))
    await run(pipeline, Deadline(0.5), question="q", bypass_cache=True)
    (embed,), (retrieve,), (generate,) = embedding.timeouts, retrieval.timeouts, generation.timeouts
    assert 0.4 < embed <= 0.5, f"embed: its 2 s budget cut to the 0.5 s deadline, got {embed}"
    assert retrieve == 0.1, f"retrieve: its own 0.1 s budget (less than is left), got {retrieve}"
    assert 0 < generate <= 0.5 - 0.1, f"generate: what is left after the 0.1 s embedding, got {generate}"


class SlowHistoryStore(ConversationStore):
    """The in-process store, with every history load taking ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(ConversationConfig(), None, prefix="u:")
        self.delay = delay
        self.loads = 0

    async def history(self, tenant: str, conversation_id: str) -> list[common_pb2.ChatTurn]:
        await asyncio.sleep(self.delay)
        self.loads += 1
        return await super().history(tenant, conversation_id)


async def test_history_load_and_query_embedding_run_concurrently():
    store = SlowHistoryStore(delay=0.2)
    await store.append("t", "c", "earlier?", "earlier answer")
    generation = FakeGeneration()
    pipeline = make(embedding=FakeEmbedding(delay=0.2), generation=generation, conversations=store)
    request = gateway_pb2.AskRequest(question="q", conversation_id="c")
    started = time.perf_counter()
    sources_after = None
    async for event in pipeline.stream("t", request, pipeline.plan("t", request), Deadline(None)):
        if event.HasField("sources"):
            sources_after = time.perf_counter() - started
    assert sources_after is not None and sources_after < 0.35, \
        f"Sources after {sources_after} s: a 0.2 s history load and a 0.2 s embedding must overlap"
    assert store.loads == 1
    assert [t.content for t in generation.requests[0].history] == ["earlier?", "earlier answer"]


def _stage_count(stage: str) -> float:
    return REGISTRY.get_sample_value("ragfleet_gateway_ask_stage_seconds_count", {"stage": stage}) or 0.0


async def test_every_stage_is_timed_into_its_field_and_its_histogram():
    stages = ("cache", "history", "embed", "retrieve", "first_token", "total")
    before = {stage: _stage_count(stage) for stage in stages}
    store = SlowHistoryStore(delay=0.05)
    events = await run(make(conversations=store), question="Q?", conversation_id="c")
    timings = events[-1].finished.timings
    assert {stage: _stage_count(stage) - before[stage] for stage in stages} == dict.fromkeys(stages, 1)
    assert timings.history_ms >= 50 and timings.cache_ms > 0 and timings.embed_ms > 0 and timings.retrieve_ms > 0
    assert timings.first_token_ms <= timings.total_ms


def _lookups(result: str) -> float:
    return REGISTRY.get_sample_value("ragfleet_gateway_cache_lookups_total", {"result": result}) or 0.0


def _hit_ratio() -> float | None:
    return REGISTRY.get_sample_value("ragfleet_gateway_cache_hit_ratio")


async def test_cache_outcomes_are_exported_and_a_bypass_stays_out_of_the_hit_ratio():
    """The ratio gauge is process-global but set from the recording cache's own counts: a fresh cache here."""
    results = ("miss", "hit_exact", "hit_semantic", "bypass", "error")
    before = {r: _lookups(r) for r in results}
    pipeline = make()
    miss = await run(pipeline, question="Q?")
    assert _hit_ratio() == 0.0
    hit = await run(pipeline, question="q")
    assert _hit_ratio() == 0.5
    bypass = await run(pipeline, question="q", bypass_cache=True)
    assert [events[-1].finished.cache_status for events in (miss, hit, bypass)] == [
        gateway_pb2.CACHE_STATUS_MISS, gateway_pb2.CACHE_STATUS_HIT_EXACT, gateway_pb2.CACHE_STATUS_BYPASS]
    assert {r: _lookups(r) - before[r] for r in results} == {
        "miss": 1, "hit_exact": 1, "hit_semantic": 0, "bypass": 1, "error": 0}
    assert _hit_ratio() == 0.5, "1 hit of 2 lookups: a bypass is counted under its label, not as a lookup"


async def test_semantic_hit_needs_the_same_filters_top_k_and_params():
    """FakeEmbedding gives every question the same vector, so only the fingerprint can keep these apart."""
    generation = FakeGeneration()
    pipeline = make(generation=generation, cache=ResponseCache(CacheConfig(redis_prefix="s:", semantic=True), None))

    def only(doc: str) -> list[common_pb2.FieldCondition]:
        return [common_pb2.FieldCondition(field="doc_id", any_of=[doc])]

    await run(pipeline, question="What is the refund policy?", filters=only("contract-A"))
    for fields in ({"filters": only("contract-B")}, {"filters": only("contract-A"), "top_k": 2},
                   {"filters": only("contract-A"), "params": common_pb2.GenerationParams(max_tokens=7)},
                   {"filters": only("contract-A"), "mode": common_pb2.SEARCH_MODE_SPARSE}):
        calls = generation.calls
        events = await run(pipeline, question="What is the refund policy?", **fields)
        assert events[-1].finished.cache_status == gateway_pb2.CACHE_STATUS_MISS, fields
        assert generation.calls == calls + 1, f"another request's answer was served for {fields}"
    calls = generation.calls
    same = await run(pipeline, question="Tell me the refund policy", filters=only("contract-A"))
    assert same[-1].finished.cache_status == gateway_pb2.CACHE_STATUS_HIT_SEMANTIC and generation.calls == calls


class FreezableRedisProxy:
    """A TCP proxy in front of the real Redis that, once frozen, swallows every request and keeps the connection
    open: a Redis that accepts connections and never answers."""

    def __init__(self) -> None:
        target = urlsplit(REDIS_URL)
        self._target = (target.hostname or "127.0.0.1", target.port or 6379)
        self._db_path = target.path
        self._handlers: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self.frozen = False

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}{self._db_path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, requests: bool) -> None:
            while data := await source.read(65536):
                if requests and self.frozen:
                    continue
                sink.write(data)
                await sink.drain()

        try:
            await asyncio.gather(pump(reader, upstream_writer, True), pump(upstream_reader, writer, False))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            upstream_writer.close()

    async def close(self) -> None:
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class FreezeRedisBeforeFinishing:
    """Generation that streams normally, but Redis hangs by the time the final message comes."""

    def __init__(self, proxy: FreezableRedisProxy) -> None:
        self.proxy = proxy
        self.inner = FakeGeneration()

    async def generate_stream(self, request, *, timeout):
        async for event in self.inner.generate_stream(request, timeout=timeout):
            if event.HasField("finished"):
                self.proxy.frozen = True
            yield event


async def test_hung_redis_after_generation_delays_finished_by_the_stage_budget_only(redis_prefix, caplog):
    proxy = FreezableRedisProxy()
    client = aioredis.from_url(await proxy.start(), socket_timeout=2.0, socket_connect_timeout=1.0)
    direct = aioredis.from_url(REDIS_URL)
    cache = ResponseCache(CacheConfig(redis_prefix=redis_prefix, corpus_version_key=redis_prefix + "v:{tenant}"),
                          client)
    pipeline = make(generation=FreezeRedisBeforeFinishing(proxy), cache=cache,
                    conversations=ConversationStore(ConversationConfig(), client, prefix=redis_prefix),
                    budgets=StageBudgets(cache=0.2, history=0.2))
    request = gateway_pb2.AskRequest(question="Why is the sky blue?", conversation_id="c1")
    plan = pipeline.plan("t", request)
    try:
        last_delta = finished_at = 0.0
        events = []
        async for event in pipeline.stream("t", request, plan, Deadline(None)):
            events.append(event)
            if event.HasField("delta"):
                last_delta = time.perf_counter()
            elif event.HasField("finished"):
                finished_at = time.perf_counter()
        assert proxy.frozen and events[-1].finished.cache_status == gateway_pb2.CACHE_STATUS_MISS
        assert finished_at - last_delta < 0.6, \
            f"AskFinished waited {finished_at - last_delta:.2f} s on a hung Redis; the budgets are 0.2 s"
        assert cache.has_local(plan.cache_key), "the answer is still cached in this process"
        assert "skipped" in caplog.text
    finally:
        proxy.frozen = False
        with contextlib.suppress(Exception):
            await client.aclose()
        await proxy.close()
        keys = [k async for k in direct.scan_iter(match=redis_prefix + "*")]
        if keys:
            await direct.delete(*keys)
        await direct.aclose()
