"""Graceful shutdown of real processes: SIGTERM during an Ask stream. Health turns NOT_SERVING at once, the stream
still completes (within the grace period), and the process then exits 0.

A slow simulated LLM (20 tokens/s) keeps the stream open for about two seconds; the gateway and generation under
test are extra processes wired to the shared offline mesh's embedding and retrieval.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests.integration.conftest import MeshInfo, SimLLM, extra_mesh, start_sim_llm, stop_process

pytestmark = pytest.mark.slow

GRACE_SECONDS = 8.0
STREAM_TOKENS = 40
TOKENS_PER_SECOND = 20.0


@pytest.fixture(scope="module")
def slow_llm() -> Iterator[SimLLM]:
    sim = start_sim_llm(ttft_ms=50, tokens_per_second=TOKENS_PER_SECOND, max_tokens=STREAM_TOKENS)
    yield sim
    stop_process(sim.process)


@pytest.fixture
def draining_mesh(offline_mesh: MeshInfo, slow_llm: SimLLM, tmp_path: Path) -> Iterator[LocalMesh]:
    grace = str(GRACE_SECONDS)
    mesh = extra_mesh(offline_mesh, tmp_path, ["generation", "gateway"], env={
        "RAGFLEET_LLM_BASE_URL": slow_llm.base_url, "RAGFLEET_LLM_MODEL": "sim-llm",
        "RAGFLEET_GENERATION_FALLBACK": "false", "RAGFLEET_GATEWAY_GRACE_SECONDS": grace,
        "RAGFLEET_GENERATION_GRACE_SECONDS": grace, "RAGFLEET_LOG_LEVEL": "INFO"})
    try:
        yield mesh
    finally:
        mesh.stop()


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return reply.status


@pytest.mark.parametrize("target", ["gateway", "generation"])
async def test_sigterm_during_an_ask_stream_drains_it(draining_mesh: LocalMesh, offline_mesh: MeshInfo,
                                                      target: str) -> None:
    doc_id = f"shutdown-{uuid.uuid4().hex[:8]}"
    async with grpc.aio.insecure_channel(offline_mesh.gateway) as channel:
        await gateway_pb2_grpc.GatewayServiceStub(channel).Ingest(gateway_pb2.IngestRequest(documents=[
            gateway_pb2.Document(doc_id=doc_id, title="Glaciers",
                                 text="Glaciers are slow rivers of ice that carve valleys as they move downhill.")]),
            timeout=30)

    victim = draining_mesh.processes[target]
    async with grpc.aio.insecure_channel(draining_mesh.address("gateway")) as channel:
        call = gateway_pb2_grpc.GatewayServiceStub(channel).Ask(
            gateway_pb2.AskRequest(question="How do glaciers shape valleys?", bypass_cache=True), timeout=30)
        events = []
        async for event in call:  # read up to the first text delta: the stream is now mid-flight
            events.append(event)
            if event.HasField("delta"):
                break
        assert events[0].HasField("sources")

        victim.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = asyncio.create_task(_drain(call))
        statuses = []
        while not rest.done() and time.monotonic() - signalled < GRACE_SECONDS:
            statuses.append(await _health(victim.address))
            if statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert statuses and statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, statuses
        assert not rest.done(), "the stream ended before health could be observed: make the LLM slower"
        events += await asyncio.wait_for(rest, GRACE_SECONDS + 5)
        finished_at = time.monotonic() - signalled
        assert await call.code() == grpc.StatusCode.OK

    deltas = [e for e in events if e.HasField("delta")]
    assert events[-1].HasField("finished")
    assert events[-1].finished.finish_reason in (1, 2)  # STOP or LENGTH: a complete answer, not a cut-off
    assert len(deltas) >= STREAM_TOKENS // 2
    assert finished_at < GRACE_SECONDS
    exit_code = await asyncio.to_thread(victim.process.wait, GRACE_SECONDS + 5)
    assert exit_code == 0
    log = victim.log_path.read_text()
    assert '"msg": "draining"' in log and '"drained": true' in log


async def _drain(call) -> list[gateway_pb2.AskResponse]:
    return [event async for event in call]
