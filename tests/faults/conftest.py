"""One fault mesh per session (tests/faults/_mesh.py): started on first use, stopped (with its sim, proxies and
Redis keys) at the end even when tests fail. Each test undoes its own fault, so the order of tests does not matter."""

from __future__ import annotations

from typing import Iterator

import grpc
import pytest

from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests.faults._mesh import FaultMesh, start_fault_mesh
from tests.faults._scenarios import WORDS


@pytest.fixture(scope="session")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    fm = start_fault_mesh(tmp_path_factory.mktemp("fault-mesh"))
    try:
        yield fm
    finally:
        fm.stop()


@pytest.fixture(scope="session")
async def fm(fault_mesh: FaultMesh) -> FaultMesh:
    """The fault mesh with a small corpus in its tenant, so every Ask retrieves passages."""
    docs = [gateway_pb2.Document(doc_id=f"base-{w}", title=w.title(),
                                 text=f"{w.title()} is a word used in geology, botany and colour names. The {w} "
                                      f"samples were collected near the {WORDS[(i + 3) % len(WORDS)]} site.")
            for i, w in enumerate(WORDS)]
    async with grpc.aio.insecure_channel(fault_mesh.gateway()) as channel:
        reply = await gateway_pb2_grpc.GatewayServiceStub(channel).Ingest(
            gateway_pb2.IngestRequest(documents=docs), metadata=fault_mesh.metadata, timeout=60)
    assert reply.documents == len(docs)
    return fault_mesh
