"""Issue 10, defect 9: a hung LLM is rescued by the fallback inside the caller's deadline.

The caller's deadline (5 s) is shorter than the LLM's first-token timeout (10 s): the first-token wait must end early
enough for the extractive fallback to answer in time, so no Ask ends DEADLINE_EXCEEDED. Real processes: a gateway and
a generation service (fallback on) wired to the session mesh's embedding and retrieval, and a sim LLM of their own
that hangs on every request. Bounded: 10 Asks at once, each with a 5 s deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests.integration.conftest import MeshInfo, extra_mesh, start_sim_llm, stop_process

ASKS = 10
DEADLINE_S = 5.0


async def test_hung_llm_is_answered_by_the_fallback_within_a_short_deadline(llm_mesh: MeshInfo, tmp_path) -> None:
    sim = start_sim_llm(hang_rate=1.0, ttft_ms=10)
    try:
        mesh = extra_mesh(llm_mesh, tmp_path, ["generation", "gateway"], env={
            "RAGFLEET_LLM_BASE_URL": sim.base_url,
            "RAGFLEET_GENERATION_FALLBACK": "true",
            "RAGFLEET_GENERATION_FIRST_TOKEN_TIMEOUT_SECONDS": "10",
            "RAGFLEET_GENERATION_MAX_RETRIES": "2",
            "RAGFLEET_GATEWAY_MAX_IN_FLIGHT": "64",
        })
        try:
            async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                key = llm_mesh.tenants.key_a

                async def ask(i: int) -> tuple[str, gateway_pb2.AskFinished | None, float]:
                    started = time.monotonic()
                    request = gateway_pb2.AskRequest(question=f"Why is the sky blue? {uuid.uuid4().hex} {i}",
                                                     bypass_cache=True)
                    finished = None
                    try:
                        async for event in stub.Ask(request, metadata=[("authorization", f"Bearer {key}")],
                                                    timeout=DEADLINE_S):
                            if event.WhichOneof("event") == "finished":
                                finished = event.finished
                        return "OK", finished, time.monotonic() - started
                    except grpc.aio.AioRpcError as exc:
                        return exc.code().name, None, time.monotonic() - started

                results = await asyncio.wait_for(asyncio.gather(*(ask(i) for i in range(ASKS))), DEADLINE_S + 10)
        finally:
            mesh.stop()
        stats = sim.stats()
    finally:
        stop_process(sim.process)
    codes = [code for code, _, _ in results]
    assert codes == ["OK"] * ASKS, codes  # on main: DEADLINE_EXCEEDED (the first-token wait took the whole deadline)
    assert all(finished is not None and finished.fallback_used for _, finished, _ in results)
    assert max(took for _, _, took in results) < DEADLINE_S
    assert stats["hangs_injected"] >= ASKS  # the LLM really was asked, and hung
