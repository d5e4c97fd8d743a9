"""Gateway behaviour against real service processes and the sim LLM (issue 4 "Tests", issue 2 bad input/down).

One session mesh (tests/integration/conftest.py) is shared; each test uses its own question texts so cache state
from one test cannot satisfy another.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.integration.conftest import LLM_MESH_MAX_IN_FLIGHT, MeshInfo, dead_address, extra_mesh

DOCS = [
    ("volcano", "Volcanoes", "A volcano is a rupture in the crust of a planet that lets hot lava, volcanic ash and "
                             "gases escape from a magma chamber below the surface. Mount Etna erupts often."),
    ("coffee", "Coffee", "Coffee is brewed from roasted coffee beans, the seeds of berries from Coffea plants. "
                         "Caffeine in coffee is a stimulant that reduces fatigue."),
    ("glacier", "Glaciers", "A glacier is a persistent body of dense ice that moves under its own weight. Glaciers "
                            "form where snow accumulation exceeds melting over many years."),
]


def _meta(key: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] if key else []


@pytest.fixture(scope="module")
async def gw(llm_mesh: MeshInfo):
    async with grpc.aio.insecure_channel(llm_mesh.gateway) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.fixture(scope="module")
async def corpus(gw, llm_mesh: MeshInfo) -> MeshInfo:
    """Tenant A holds DOCS; tenant B holds one private document of its own."""
    t = llm_mesh.tenants
    docs = [gateway_pb2.Document(doc_id=d, title=title, text=text) for d, title, text in DOCS]
    reply = await gw.Ingest(gateway_pb2.IngestRequest(documents=docs), metadata=_meta(t.key_a), timeout=60)
    assert reply.documents == 3 and reply.chunks_written >= 3
    private = gateway_pb2.Document(doc_id="b-secret", title="Project Nightjar",
                                   text="Project Nightjar is tenant B's confidential volcano monitoring drone.")
    await gw.Ingest(gateway_pb2.IngestRequest(documents=[private]), metadata=_meta(t.key_b), timeout=60)
    return llm_mesh


async def ask(gw, question: str, key: str | None, *, timeout: float = 30, **fields) -> list[gateway_pb2.AskResponse]:
    return [e async for e in gw.Ask(gateway_pb2.AskRequest(question=question, **fields), metadata=_meta(key),
                                    timeout=timeout)]


def split(events):
    kinds = [e.WhichOneof("event") for e in events]
    sources = events[0].sources.passages
    text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    return kinds, sources, text, events[-1].finished


def unique(question: str) -> str:
    """A question no other test asks (so no cache entry from elsewhere can answer it)."""
    return f"[{uuid.uuid4().hex[:6]}] {question}"


async def test_stream_order_sources_deltas_finished(gw, corpus, sim_llm):
    events = await ask(gw, unique("What is a volcano?"), corpus.tenants.key_a)
    kinds, sources, text, finished = split(events)
    assert kinds[0] == "sources" and kinds[-1] == "finished"
    assert set(kinds[1:-1]) == {"delta"} and len(kinds) >= 4, kinds
    assert sources[0].doc_id == "volcano" and [p.number for p in sources] == list(range(1, len(sources) + 1))
    assert text.startswith("According") and finished.finish_reason in (common_pb2.FINISH_REASON_STOP,
                                                                      common_pb2.FINISH_REASON_LENGTH)
    assert finished.cache_status == gateway_pb2.CACHE_STATUS_MISS and finished.model == "sim-llm"
    assert finished.usage.completion_tokens > 0
    t = finished.timings
    assert t.embed_ms > 0 and t.retrieve_ms > 0 and t.cache_ms > 0
    assert 0 < t.first_token_ms <= t.total_ms


async def test_cache_hit_replays_without_generation(gw, corpus, sim_llm):
    question = unique("How do glaciers form?")
    first = split(await ask(gw, question, corpus.tenants.key_a))
    calls = sim_llm.stats()["chat_requests"]
    # normalisation: case, spacing and trailing punctuation do not matter
    second = split(await ask(gw, "  " + question.upper().rstrip("?").replace(" ", "  ") + " ", corpus.tenants.key_a))
    assert second[3].cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT
    assert second[2] == first[2] and list(second[1]) == list(first[1]), "same answer and sources"
    assert second[0][0] == "sources" and second[0][-1] == "finished" and "delta" in second[0]
    assert sim_llm.stats()["chat_requests"] == calls, "a hit must not call generation"
    bypass = split(await ask(gw, question, corpus.tenants.key_a, bypass_cache=True))
    assert bypass[3].cache_status == gateway_pb2.CACHE_STATUS_BYPASS
    assert sim_llm.stats()["chat_requests"] == calls + 1


async def test_ingestion_through_another_replica_invalidates(gw, corpus, sim_llm, tmp_path):
    question = unique("What does caffeine do?")
    assert split(await ask(gw, question, corpus.tenants.key_a))[3].cache_status == gateway_pb2.CACHE_STATUS_MISS
    assert split(await ask(gw, question, corpus.tenants.key_a))[3].cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT
    # a second gateway replica sharing Redis ingests; the first replica's L1 copy must not be served afterwards
    replica = extra_mesh(corpus, tmp_path, ["gateway"])
    try:
        async with grpc.aio.insecure_channel(replica.address("gateway")) as channel:
            other = gateway_pb2_grpc.GatewayServiceStub(channel)
            doc = gateway_pb2.Document(doc_id="tea", title="Tea", text="Tea also contains caffeine, less than coffee.")
            await other.Ingest(gateway_pb2.IngestRequest(documents=[doc]), metadata=_meta(corpus.tenants.key_a),
                               timeout=60)
            # and the replica sees entries the first one wrote (after the bump they are gone for both)
            after = split(await ask(gw, question, corpus.tenants.key_a))
            assert after[3].cache_status == gateway_pb2.CACHE_STATUS_MISS
            again = split(await ask(other, question, corpus.tenants.key_a))
            assert again[3].cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT
            await other.DeleteDocuments(gateway_pb2.DeleteDocumentsRequest(doc_ids=["tea"]),
                                        metadata=_meta(corpus.tenants.key_a), timeout=30)
            final = split(await ask(gw, question, corpus.tenants.key_a))
            assert final[3].cache_status == gateway_pb2.CACHE_STATUS_MISS, "a delete invalidates too"
            assert "tea" not in {p.doc_id for p in final[1]}
    finally:
        replica.stop()


async def test_tenant_isolation_of_sources_and_cache(gw, corpus):
    t = corpus.tenants
    question = unique("What is Project Nightjar, the volcano drone?")
    a_events = split(await ask(gw, question, t.key_a))
    assert "b-secret" not in {p.doc_id for p in a_events[1]}
    b_first = split(await ask(gw, question, t.key_b))
    assert b_first[3].cache_status == gateway_pb2.CACHE_STATUS_MISS, "A's cached answer must not reach B"
    assert {p.doc_id for p in b_first[1]} == {"b-secret"}
    a_again = split(await ask(gw, question, t.key_a))
    assert a_again[3].cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT
    assert "b-secret" not in {p.doc_id for p in a_again[1]}


async def test_client_cancel_stops_the_llm_request(gw, corpus, sim_settings):
    sim = sim_settings
    sim.configure(tokens_per_second=5, max_tokens=60)  # a 12 s stream
    before = sim.stats()["disconnects"]
    call = gw.Ask(gateway_pb2.AskRequest(question=unique("Tell me about Mount Etna"), bypass_cache=True),
                  metadata=_meta(corpus.tenants.key_a), timeout=30)
    assert (await call.read()).WhichOneof("event") == "sources"
    assert (await call.read()).WhichOneof("event") == "delta"
    call.cancel()
    stats = sim.wait_for(lambda s: s["disconnects"] > before and s["active_streams"] == 0, timeout=5)
    assert stats["disconnects"] == before + 1 and stats["active_streams"] == 0


async def test_deadline_exceeded_within_budget_and_llm_cancelled(gw, corpus, sim_settings):
    sim = sim_settings
    sim.configure(tokens_per_second=2, max_tokens=20)  # the first token comes quickly, then the stream crawls
    before = sim.stats()["disconnects"]
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ask(gw, unique("What is a glacier?"), corpus.tenants.key_a, timeout=0.8)
    elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.3, f"took {elapsed:.2f}s for a 0.8s deadline"
    stats = sim.wait_for(lambda s: s["disconnects"] > before, timeout=5)
    assert stats["disconnects"] > before, "the propagated deadline must end the LLM request"


async def test_overload_is_rejected_at_once(gw, corpus, sim_settings):
    sim = sim_settings
    sim.configure(ttft_ms=3000)
    calls = [gw.Ask(gateway_pb2.AskRequest(question=unique("Coffee?"), bypass_cache=True),
                    metadata=_meta(corpus.tenants.key_a), timeout=30) for _ in range(LLM_MESH_MAX_IN_FLIGHT)]
    try:
        for call in calls:  # each holds a slot once its sources have been sent
            assert (await call.read()).WhichOneof("event") == "sources"
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ask(gw, unique("One more?"), corpus.tenants.key_a)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "MAX_IN_FLIGHT" in info.value.details()
        assert time.monotonic() - started < 0.5
    finally:
        for call in calls:
            call.cancel()
    await asyncio.sleep(0.2)
    sim.configure(ttft_ms=30)
    # slots are released when streams end
    assert split(await ask(gw, unique("Coffee again?"), corpus.tenants.key_a))[0][-1] == "finished"


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_missing_or_unknown_key_is_unauthenticated(gw, corpus, key):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ask(gw, "What is a volcano?", key)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.Ingest(gateway_pb2.IngestRequest(documents=[gateway_pb2.Document(doc_id="x", text="y")]),
                        metadata=_meta(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("fields, needle", [
    ({"question": "   "}, "question"),
    ({"question": "ok?", "top_k": -1}, "top_k"),
    ({"question": "ok?", "top_k": 1000}, "50"),
    ({"question": "x" * 5000}, "4000"),
    ({"question": "ok?", "params": common_pb2.GenerationParams(max_tokens=0)}, "params.max_tokens"),
])
async def test_bad_ask_input_is_invalid_argument(gw, corpus, fields, needle):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [e async for e in gw.Ask(gateway_pb2.AskRequest(**fields), metadata=_meta(corpus.tenants.key_a), timeout=10)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


@pytest.mark.parametrize("request_, needle", [
    (gateway_pb2.IngestRequest(), "documents"),
    (gateway_pb2.IngestRequest(documents=[gateway_pb2.Document(doc_id="", text="t")]), "doc_id"),
    (gateway_pb2.IngestRequest(documents=[gateway_pb2.Document(doc_id="d", text=" ")]), "text"),
    (gateway_pb2.IngestRequest(documents=[gateway_pb2.Document(doc_id="d", text="t")], chunk_tokens=100000),
     "chunk_tokens"),
])
async def test_bad_ingest_input_is_invalid_argument(gw, corpus, request_, needle):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.Ingest(request_, metadata=_meta(corpus.tenants.key_a), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


async def test_conversation_follow_up_sends_history(gw, corpus, sim_llm):
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    opening = unique("What is a volcano?")
    first = split(await ask(gw, opening, corpus.tenants.key_a, conversation_id=conversation))
    assert first[3].cache_status == gateway_pb2.CACHE_STATUS_MISS and first[3].conversation_id == conversation
    follow_up = split(await ask(gw, "Which one erupts often?", corpus.tenants.key_a, conversation_id=conversation))
    assert follow_up[3].cache_status == gateway_pb2.CACHE_STATUS_BYPASS, "an answer with history is never cached"
    messages = sim_llm.stats()["last_chat_request"]["messages"]
    contents = " ".join(str(m.get("content")) for m in messages)
    assert opening in contents and first[2] in contents, "earlier turn sent as history"
    # another tenant using the same conversation id gets none of it
    await ask(gw, "Which one erupts often?", corpus.tenants.key_b, conversation_id=conversation)
    contents_b = " ".join(str(m.get("content")) for m in sim_llm.stats()["last_chat_request"]["messages"])
    assert opening not in contents_b
    # a new conversation opening with the same question is served from cache, and the turn is still remembered
    fresh = f"conv-{uuid.uuid4().hex[:8]}"
    again = split(await ask(gw, opening, corpus.tenants.key_a, conversation_id=fresh))
    assert again[3].cache_status == gateway_pb2.CACHE_STATUS_HIT_EXACT and again[2] == first[2]
    await ask(gw, "Does it erupt often?", corpus.tenants.key_a, conversation_id=fresh)
    contents = " ".join(str(m.get("content")) for m in sim_llm.stats()["last_chat_request"]["messages"])
    assert opening in contents and first[2] in contents


async def test_llm_failure_unavailable_or_fallback_per_config(gw, corpus, sim_settings, tmp_path):
    sim = sim_settings
    sim.configure(failure_rate=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ask(gw, unique("What is coffee?"), corpus.tenants.key_a)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "generation" in info.value.details()
    # the same failure with a generation service configured to fall back to the offline answerer
    fallback = extra_mesh(corpus, tmp_path, ["generation", "gateway"], env={"RAGFLEET_GENERATION_FALLBACK": "true"})
    try:
        async with grpc.aio.insecure_channel(fallback.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            kinds, sources, text, finished = split(await ask(stub, unique("What is coffee?"), corpus.tenants.key_a))
            assert finished.fallback_used and text and kinds[-1] == "finished"
            assert "[1]" in text or "[2]" in text
    finally:
        fallback.stop()


async def test_downstream_down_is_unavailable_naming_it_fast(corpus, tmp_path):
    broken = extra_mesh(corpus, tmp_path, ["gateway"], gateway_env={
        "RAGFLEET_GATEWAY_EMBEDDING_ADDRESS": dead_address(), "RAGFLEET_GATEWAY_RETRIEVAL_ADDRESS": dead_address()})
    try:
        async with grpc.aio.insecure_channel(broken.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for call, service in [
                (lambda: ask(stub, unique("What is a volcano?"), corpus.tenants.key_a), "embedding"),
                (lambda: stub.DeleteDocuments(gateway_pb2.DeleteDocumentsRequest(doc_ids=["x"]),
                                              metadata=_meta(corpus.tenants.key_a), timeout=10), "retrieval"),
            ]:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details().startswith(service), info.value.details()
                assert time.monotonic() - started < 2.0
    finally:
        broken.stop()
