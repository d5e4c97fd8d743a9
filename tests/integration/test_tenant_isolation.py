"""Tenant isolation under concurrency (issue 10): many tenants asking and ingesting at once, through every cache.

Every tenant stores documents with the SAME doc ids and the same wording, differing only in a marker token unique to
the tenant, and asks the SAME questions, in the same conversation id. So a key that forgets the tenant anywhere
(exact response cache in L1 or Redis, semantic cache, retrieval result cache, point ids, conversations) would hand
one tenant another's chunks, and the marker shows it. The offline extractive answerer quotes the passages, so a
foreign chunk would show in the answer text as well as in the sources. Two gateway replicas share Redis (L2 hits),
and ingests and deletes run while the others ask.
"""

from __future__ import annotations

import asyncio
import random
import re
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import pytest
import redis

from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow

TENANTS = 6
CONCURRENCY = 12
DOC_IDS = ("bees", "honey", "wax")
QUESTIONS = ("Why do honeybee colonies swarm?", "How do bees make honey?", "What is beeswax used for?",
             "How do bees find flowers?")
# Close enough to their question to be semantic hits at the threshold below, not equal after normalisation.
PARAPHRASES = ("Why do honey bee colonies swarm?", "How is honey made by bees?", "What is bees wax used for?",
               "How do honeybees find flowers?")
CONVERSATION = "shared-conversation-id"  # the same id in every tenant
MARKER = re.compile(r"zq\d+x[0-9a-f]{6}")


def _text(marker: str, doc_id: str) -> str:
    body = {
        "bees": "Honeybee colonies swarm in spring {m}. The old queen leaves with half the workers {m}. "
                "Bees find flowers by scent and by the waggle dance {m}.",
        "honey": "Bees make honey from flower nectar {m}. Workers fan the nectar until the water evaporates {m}. "
                 "Honey is stored in wax cells and capped {m}.",
        "wax": "Beeswax is used for candles and polish {m}. Worker bees secrete wax from glands {m}. "
               "The comb of wax holds brood and honey {m}.",
    }
    return body.get(doc_id, "Extra notes on bees and honey {m}. Bees dance to share food {m}.").format(m=marker)


@dataclass
class Tenant:
    index: int
    name: str
    key: str
    marker: str
    doc_ids: set[str] = field(default_factory=lambda: set(DOC_IDS))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@dataclass
class IsolationMesh:
    primary: LocalMesh
    replica: LocalMesh
    tenants: list[Tenant]
    prefix: str

    @property
    def gateways(self) -> list[str]:
        return [self.primary.address("gateway"), self.replica.address("gateway")]


@pytest.fixture(scope="module")
def isolation_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolationMesh]:
    run = uuid.uuid4().hex[:6]
    tenants = [Tenant(i, f"iso-{run}-{i}", f"iso-key-{run}-{i}", f"zq{i}x{uuid.uuid4().hex[:6]}")
               for i in range(TENANTS)]
    prefix = f"ragfleet-test:{run}:iso:"
    env = {
        "RAGFLEET_LLM_BASE_URL": "",  # the offline extractive answerer quotes passages: foreign text would show
        "RAGFLEET_REDIS_URL": REDIS_URL,
        "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix + "gw:",
        "RAGFLEET_EMBEDDING_L2_PREFIX": prefix + "emb:",
        "RAGFLEET_GATEWAY_API_KEYS": ",".join(f"{t.key}={t.name}" for t in tenants),
        "RAGFLEET_GATEWAY_SEMANTIC_CACHE": "true",
        "RAGFLEET_GATEWAY_SEMANTIC_THRESHOLD": "0.85",
        "RAGFLEET_LOG_LEVEL": "WARNING",
    }
    data_dir = tmp_path_factory.mktemp("isolation")
    primary = LocalMesh(data_dir=data_dir / "primary", env=env)
    replica: LocalMesh | None = None
    try:
        primary.start()
        upstreams = {f"RAGFLEET_GATEWAY_{n.upper()}_ADDRESS": primary.address(n)
                     for n in ("embedding", "retrieval", "generation")}
        kwargs = {"credentials": primary.credentials} if hasattr(primary, "credentials") else {}
        replica = LocalMesh(data_dir=data_dir / "replica", env={**env, **upstreams}, **kwargs)
        replica.start(["gateway"])
        yield IsolationMesh(primary, replica, tenants, prefix)
    finally:
        if replica is not None:
            replica.stop()
        primary.stop()
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for pattern in [prefix + "*"] + [f"ragfleet:retrieval:*iso-{run}-*"]:
                keys = list(client.scan_iter(match=pattern, count=1000))
                if keys:
                    client.delete(*keys)
        finally:
            client.close()


@dataclass
class Audit:
    """Every answer checked; foreign markers and doc ids are collected, not asserted one by one."""

    foreign: list[str] = field(default_factory=list)
    cache_status: Counter[str] = field(default_factory=Counter)
    asks: int = 0
    errors: list[str] = field(default_factory=list)

    def check(self, tenant: Tenant, what: str, events: list[gateway_pb2.AskResponse]) -> list[common_pb2.Passage]:
        self.asks += 1
        passages = [p for e in events if e.WhichOneof("event") == "sources" for p in e.sources.passages]
        text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
        finished = [e.finished for e in events if e.WhichOneof("event") == "finished"]
        if finished:
            self.cache_status[gateway_pb2.CacheStatus.Name(finished[-1].cache_status)] += 1
        for p in passages:
            # one chunk per document (they are short), so every chunk holds its owner's marker whole
            others = set(MARKER.findall(p.text + p.title)) - {tenant.marker}
            if others or tenant.marker not in p.text:
                self.foreign.append(f"{tenant.name} {what}: passage {p.doc_id}/{p.chunk_id} holds {others or '?'}")
        for marker in set(MARKER.findall(text)) - {tenant.marker}:
            self.foreign.append(f"{tenant.name} {what}: answer text holds foreign marker {marker}")
        return passages


async def _ask(stub: gateway_pb2_grpc.GatewayServiceStub, tenant: Tenant, audit: Audit, what: str,
               request: gateway_pb2.AskRequest) -> list[common_pb2.Passage]:
    try:
        events = [e async for e in stub.Ask(request, metadata=tenant.metadata, timeout=60)]
    except grpc.aio.AioRpcError as exc:
        audit.errors.append(f"{tenant.name} {what}: {exc.code().name} {exc.details()}")
        return []
    return audit.check(tenant, what, events)


async def _ingest(stub: gateway_pb2_grpc.GatewayServiceStub, tenant: Tenant, audit: Audit, doc_ids: list[str]) -> None:
    docs = [gateway_pb2.Document(doc_id=d, title=d.title(), text=_text(tenant.marker, d)) for d in doc_ids]
    try:
        await stub.Ingest(gateway_pb2.IngestRequest(documents=docs), metadata=tenant.metadata, timeout=120)
        tenant.doc_ids.update(doc_ids)
    except grpc.aio.AioRpcError as exc:
        audit.errors.append(f"{tenant.name} ingest {doc_ids}: {exc.code().name} {exc.details()}")


def _metric(port: int, name: str) -> Counter[str]:
    """label value -> sum, for one counter with one label, from a service's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        match = re.match(rf'{name}\{{\w+="([^"]*)"\}} ([0-9.e+]+)', line)
        if match:
            out[match[1]] += float(match[2])
    return out


async def test_no_foreign_chunks_under_concurrency(isolation_mesh: IsolationMesh) -> None:
    im = isolation_mesh
    audit = Audit()
    rng = random.Random(10)
    channels = [grpc.aio.insecure_channel(a) for a in im.gateways]
    stubs = [gateway_pb2_grpc.GatewayServiceStub(c) for c in channels]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def bounded(coro) -> None:  # type: ignore[no-untyped-def]
        async with limit:
            await coro

    try:
        # every tenant ingests the same doc ids at once
        await asyncio.gather(*(bounded(_ingest(stubs[t.index % 2], t, audit, list(DOC_IDS))) for t in im.tenants))
        assert not audit.errors, audit.errors

        async def conversation(t: Tenant) -> None:
            # follow-ups in the same conversation id as every other tenant; the first turn may come from the cache
            for turn, question in enumerate(QUESTIONS[:3]):
                await bounded(_ask(stubs[turn % 2], t, audit, f"conversation turn {turn}",
                                   gateway_pb2.AskRequest(question=question, conversation_id=CONVERSATION)))

        work = []
        for t in im.tenants:
            for round_ in range(2):  # the second round hits the exact cache, on the other replica half the time
                for q in QUESTIONS:
                    work.append(bounded(_ask(stubs[(t.index + round_) % 2], t, audit, f"exact r{round_} {q!r}",
                                             gateway_pb2.AskRequest(question=q))))
            for q in PARAPHRASES:
                work.append(bounded(_ask(stubs[t.index % 2], t, audit, f"paraphrase {q!r}",
                                         gateway_pb2.AskRequest(question=q))))
            for q in QUESTIONS:  # other params: a response-cache miss, but the embedding and retrieval caches hit
                work.append(bounded(_ask(stubs[(t.index + 1) % 2], t, audit, f"params {q!r}", gateway_pb2.AskRequest(
                    question=q, params=common_pb2.GenerationParams(max_tokens=100)))))
            work.append(bounded(_ingest(stubs[t.index % 2], t, audit, [f"extra-{t.index}", "honey"])))
            work.append(conversation(t))  # bounds each of its turns itself
        rng.shuffle(work)
        await asyncio.gather(*work)

        # odd tenants delete "wax" while the even ones keep it; nobody's delete may touch another's
        deleting = [t for t in im.tenants if t.index % 2]
        for t in deleting:
            await stubs[0].DeleteDocuments(gateway_pb2.DeleteDocumentsRequest(doc_ids=["wax"]),
                                           metadata=t.metadata, timeout=60)
            t.doc_ids.discard("wax")
        wax: dict[str, list[common_pb2.Passage]] = {}

        async def ask_wax(t: Tenant) -> None:
            wax[t.name] = await _ask(stubs[1], t, audit, "after delete", gateway_pb2.AskRequest(
                question="What is beeswax used for?", bypass_cache=True, top_k=10))

        await asyncio.gather(*(bounded(ask_wax(t)) for t in im.tenants))
    finally:
        for channel in channels:
            await channel.close()

    assert not audit.errors, audit.errors
    assert audit.foreign == [], f"{len(audit.foreign)} foreign chunks in {audit.asks} answers: {audit.foreign[:20]}"
    for t in im.tenants:
        doc_ids = {p.doc_id for p in wax[t.name]}
        assert ("wax" in doc_ids) == (t.index % 2 == 0), (t.name, doc_ids)
        assert doc_ids <= t.doc_ids, (t.name, doc_ids)

    # conversations: each tenant's stored history holds its own answers only, and exactly its own turns
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for t in im.tenants:
            keys = list(client.scan_iter(match=f"{im.prefix}gw:conv:{t.name}:*"))
            assert len(keys) == 1, (t.name, keys)
            turns = [raw.decode() for raw in client.lrange(keys[0], 0, -1)]
            assert len(turns) == 6, (t.name, turns)
            found = {m for raw in turns for m in MARKER.findall(raw)}
            assert found <= {t.marker}, (t.name, found)
    finally:
        client.close()

    # the run went through every cache, so the 0 above means something
    assert audit.cache_status["CACHE_STATUS_HIT_EXACT"] > 0 and audit.cache_status["CACHE_STATUS_HIT_SEMANTIC"] > 0, \
        audit.cache_status
    lookups = _metric(im.primary.metrics_ports["gateway"], "ragfleet_gateway_cache_lookups_total") + \
        _metric(im.replica.metrics_ports["gateway"], "ragfleet_gateway_cache_lookups_total")
    assert lookups["hit_exact"] > 0 and lookups["hit_semantic"] > 0, lookups
    retrieval = _metric(im.primary.metrics_ports["retrieval"], "ragfleet_retrieval_cache_total")
    assert retrieval["l1_hit"] + retrieval["l2_hit"] > 0, retrieval
    embedding = _metric(im.primary.metrics_ports["embedding"], "ragfleet_embedding_cache_hits_total")
    assert sum(embedding.values()) > 0, embedding
