"""Issue 10, defects 4, 5 and 6 through a real mesh (`offline_mesh`: four service processes on loopback).

Everything refusable in an Ask is refused with INVALID_ARGUMENT before the first event (main sent Sources, then the
error), with generation's own limits and wording; oversized ingest input is refused naming the field; a document
over the chunk limit is refused before any embedding (main embedded it for ~12 s first), naming the document.
"""

from __future__ import annotations

import time

import grpc
import pytest

from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.integration.conftest import MeshInfo

GP = common_pb2.GenerationParams


@pytest.fixture(scope="module")
async def gw(offline_mesh: MeshInfo):
    async with grpc.aio.insecure_channel(offline_mesh.gateway) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.mark.parametrize("params, message", [
    (GP(max_tokens=5000), r"params.max_tokens: 5000 is outside [1, 4096]"),
    (GP(stop=["a", "b", "c", "d", "e"]), "params.stop: 5 sequences exceeds the limit of 4"),
    (GP(stop=["ok", ""]), "params.stop[1]: must not be empty"),
    (GP(stop=["x" * 300]), "params.stop[0]: 300 characters exceeds the limit of 256"),
    (GP(temperature=3.0), "params.temperature: 3 is outside [0, 2]"),
    (GP(top_p=1.5), "params.top_p: 1.5 is outside (0, 1]"),
    (GP(model="m" * 300), "params.model: 300 characters exceeds the limit of 256"),
])
async def test_bad_generation_params_are_refused_before_the_first_event(gw, params, message) -> None:
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for event in gw.Ask(gateway_pb2.AskRequest(question="Why do bees swarm?", params=params,
                                                         bypass_cache=True), timeout=30):
            events.append(event.WhichOneof("event"))
    assert events == []  # main: ["sources"], then the error
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


async def test_oversized_filters_are_refused_before_the_first_event(gw) -> None:
    filters = [common_pb2.FieldCondition(field="lang", any_of=["en"])] * 17
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in gw.Ask(gateway_pb2.AskRequest(question="bees?", filters=filters), timeout=30):
            pytest.fail("an event before the refusal")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filters: 17 conditions exceeds the limit of 16" in err.value.details()


@pytest.mark.parametrize("document, message", [
    (gateway_pb2.Document(doc_id="m1", text="t", metadata={f"k{i}": "v" for i in range(10_000)}),
     "documents[0].metadata (doc_id 'm1'): 10000 entries exceeds the limit of 64"),
    (gateway_pb2.Document(doc_id="m2", text="t", metadata={"big": "v" * 100_000}),
     "documents[0].metadata (doc_id 'm2')['big']: value of 100000 characters exceeds the limit of 2048"),
    (gateway_pb2.Document(doc_id="m3", text="t", title="T" * 5000),
     "documents[0].title (doc_id 'm3'): 5000 characters exceeds the limit of 1024"),
    (gateway_pb2.Document(doc_id="d" * 300, text="t"), "documents[0].doc_id: 300 characters exceeds the limit of 256"),
])
async def test_oversized_ingest_fields_are_refused_naming_the_field(gw, document, message) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.Ingest(gateway_pb2.IngestRequest(documents=[document]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


async def test_a_document_over_the_chunk_limit_is_refused_before_embedding(gw) -> None:
    words = "Honeybees swarm when the colony outgrows its hive and the old queen leaves with half the workers. "
    text = words * (195_000 // len(words))  # ~195 KB: ~3000 chunks at chunk_tokens=16, over 2048 per document
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.Ingest(gateway_pb2.IngestRequest(
            documents=[gateway_pb2.Document(doc_id="small-ok", text="A short note."),
                       gateway_pb2.Document(doc_id="huge-manual", text=text)], chunk_tokens=16), timeout=60)
    took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "documents[1] (doc_id 'huge-manual')" in details and "exceeds the limit of 2048 chunks" in details
    assert took < 3.0, f"refused after {took:.1f} s: it was embedded first"  # main: ~12 s of embedding, then refused
    # Nothing of the request was written: the short document is not searchable either.
    events = [e async for e in gw.Ask(gateway_pb2.AskRequest(question="A short note.", bypass_cache=True), timeout=30)]
    assert all(p.doc_id != "small-ok" for p in events[0].sources.passages)
