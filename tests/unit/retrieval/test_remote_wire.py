"""What the RemoteStore puts on the wire to a Qdrant server, seen by a stand-in that speaks Qdrant's gRPC protocol.

No Qdrant server binary can run here, and qdrant-client's local mode ignores search parameters, so the server side of
the one call under test (Points/Query) is served from qdrant-client's own generated gRPC stubs and records the request.
"""

from __future__ import annotations

import grpc
import pytest
from qdrant_client.grpc import points_pb2, points_service_pb2_grpc, qdrant_common_pb2

from services.retrieval.config import IndexConfig
from services.retrieval.models import TENANT
from services.retrieval.store.remote import RemoteStore


class _RecordingPoints(points_service_pb2_grpc.PointsServicer):
    def __init__(self) -> None:
        self.queries: list[points_pb2.QueryPoints] = []

    async def Query(self, request: points_pb2.QueryPoints,
                    context: grpc.aio.ServicerContext) -> points_pb2.QueryResponse:
        self.queries.append(request)
        return points_pb2.QueryResponse(result=[points_pb2.ScoredPoint(id=qdrant_common_pb2.PointId(num=7), score=0.5)])


@pytest.fixture
async def qdrant_grpc():
    servicer = _RecordingPoints()
    server = grpc.aio.server()
    points_service_pb2_grpc.add_PointsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(None)


@pytest.mark.parametrize(("selectivity", "sent"), [(0.4, True), (0.0, False)])
async def test_dense_search_sends_hnsw_ef_acorn_and_the_tenant_filter(qdrant_grpc, selectivity, sent):
    servicer, port = qdrant_grpc
    store = RemoteStore(url="http://127.0.0.1:9", grpc_port=port, collection="chunks",
                        index=IndexConfig(dimension=4, hnsw_ef=96, acorn_max_selectivity=selectivity))
    try:
        hits = await store.dense("acme", [0.1, 0.2, 0.3, 0.4], 5, ())
    finally:
        await store.close()
    assert [(h.point_id, h.score) for h in hits] == [("7", 0.5)]
    (query,) = servicer.queries
    assert query.collection_name == "chunks" and query.limit == 5 and query.using == "dense"
    assert query.params.hnsw_ef == 96
    assert query.params.HasField("acorn") is sent
    if sent:
        assert query.params.acorn.enable and query.params.acorn.max_selectivity == pytest.approx(0.4)
    conditions = [(c.field.key, c.field.match.keyword) for c in query.filter.must]
    assert conditions == [(TENANT, "acme")]  # every search is confined to the caller's tenant
