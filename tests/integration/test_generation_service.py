"""The generation service as real processes (LocalMesh) against the simulated LLM: stream order, usage,
cancellation reaching the LLM, failure -> fallback or UNAVAILABLE per config, hang -> timeout, deadlines."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

import grpc
import httpx
import pytest
import pytest_asyncio

from services.cli import sim_llm
from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2, generation_pb2_grpc

SIM = sim_llm.SimConfig(ttft_ms=30, tokens_per_second=400, max_tokens=20)
PASSAGES = [
    common_pb2.Passage(number=1, title="Qdrant", text="Qdrant is a vector database written in Rust.", score=0.9),
    common_pb2.Passage(number=2, title="Redis", text="Redis keeps data in memory.", score=0.5),
]
REQUEST = generation_pb2.GenerateRequest(question="Which language is Qdrant written in?", passages=PASSAGES)
TIMEOUTS = {"RAGFLEET_GENERATION_FIRST_TOKEN_TIMEOUT_SECONDS": "0.5", "RAGFLEET_GENERATION_MAX_RETRIES": "1",
            "RAGFLEET_GENERATION_RETRY_BACKOFF_SECONDS": "0.05"}


class Harness:
    def __init__(self, control: httpx.AsyncClient, stubs: dict[str, generation_pb2_grpc.GenerationServiceStub]):
        self.control = control
        self.stubs = stubs

    async def configure(self, **changes) -> None:
        await self.control.post("/_sim/config", json={**asdict(SIM), **changes})
        await self.control.post("/_sim/reset")

    async def stats(self) -> dict:
        return (await self.control.get("/_sim/stats")).json()


@pytest_asyncio.fixture(scope="module")
async def harness(tmp_path_factory):
    runner, port = await sim_llm.start(sim_llm.SimConfig(**asdict(SIM)))
    llm = {"RAGFLEET_LLM_BASE_URL": f"http://127.0.0.1:{port}/v1", "RAGFLEET_LLM_MODEL": "sim-model", **TIMEOUTS}
    variants = {
        "offline": {},
        "strict": {**llm, "RAGFLEET_GENERATION_FALLBACK": "false"},
        "fallback": {**llm, "RAGFLEET_GENERATION_FALLBACK": "true"},
    }
    meshes = {name: LocalMesh(data_dir=tmp_path_factory.mktemp(f"gen-{name}"), env={"RAGFLEET_LOG_LEVEL": "WARNING"},
                              service_env={"generation": env}) for name, env in variants.items()}
    channels = []
    try:
        await asyncio.gather(*(asyncio.to_thread(m.start, ["generation"], timeout=60) for m in meshes.values()))
        stubs = {}
        for name, mesh in meshes.items():
            channel = mesh.internal_channel("generation", aio=True)
            channels.append(channel)
            stubs[name] = generation_pb2_grpc.GenerationServiceStub(channel)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as control:
            yield Harness(control, stubs)
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.gather(*(asyncio.to_thread(m.stop) for m in meshes.values()))
        await runner.cleanup()


async def timed(call) -> tuple[list[generation_pb2.GenerateResponse], list[float]]:
    started = time.perf_counter()
    messages, at = [], []
    async for message in call:
        messages.append(message)
        at.append(time.perf_counter() - started)
    return messages, at


def check_order(messages) -> generation_pb2.GenerationFinished:
    """Deltas, then exactly one GenerationFinished, last."""
    assert len(messages) >= 2
    assert all(m.WhichOneof("event") == "delta" for m in messages[:-1])
    assert messages[-1].WhichOneof("event") == "finished"
    return messages[-1].finished


async def test_offline_process_answers_with_citations(harness):
    messages, at = await timed(harness.stubs["offline"].Generate(REQUEST, timeout=5))
    done = check_order(messages)
    assert "".join(m.delta.text for m in messages[:-1]) == "Qdrant is a vector database written in Rust [1]."
    assert done.model == "extractive" and list(done.passages_used) == [1, 2] and done.usage.completion_tokens > 0
    assert at[0] < 0.5


async def test_llm_stream_order_and_usage(harness):
    await harness.configure()
    request = generation_pb2.GenerateRequest()
    request.CopyFrom(REQUEST)
    request.params.max_tokens = 12
    messages, at = await timed(harness.stubs["strict"].Generate(request, timeout=5))
    done = check_order(messages)
    text = "".join(m.delta.text for m in messages[:-1])
    stats = await harness.stats()
    assert text.startswith("According") and len(text.split()) == 12
    assert done.model == "sim-model" and done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not done.fallback_used and list(done.passages_used) == [1, 2]
    assert done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens == sum(len(m["content"].split()) for m in stats["last_chat_request"]["messages"])
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12
    assert stats["last_chat_request"]["stream_options"] == {"include_usage": True}
    assert stats["completed_streams"] == 1 and at[0] < 1.0


async def test_cancel_mid_stream_stops_the_llm_request(harness):
    await harness.configure(tokens_per_second=20, max_tokens=200)
    call = harness.stubs["strict"].Generate(REQUEST, timeout=20)
    assert (await call.read()).WhichOneof("event") == "delta"
    assert (await harness.stats())["active_streams"] == 1
    call.cancel()
    for _ in range(100):
        stats = await harness.stats()
        if stats["disconnects"] == 1 and stats["active_streams"] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["disconnects"] == 1 and stats["active_streams"] == 0 and stats["completed_streams"] == 0


@pytest.mark.parametrize("fault", ["failure_rate", "hang_rate"])
async def test_llm_fault_without_fallback_is_unavailable(harness, fault):
    await harness.configure(**{fault: 1.0})
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await timed(harness.stubs["strict"].Generate(REQUEST, timeout=10))
    elapsed = time.perf_counter() - started
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "LLM at http://127.0.0.1:" in err.value.details() and "after 2 attempt" in err.value.details()
    stats = await harness.stats()
    assert stats["chat_requests"] == 2  # one retry, before any token
    if fault == "hang_rate":
        assert "no first token in time" in err.value.details()
        assert 1.0 <= elapsed < 2.5  # two 0.5 s first-token timeouts plus backoff, not the 10 s deadline


@pytest.mark.parametrize("fault", ["failure_rate", "hang_rate"])
async def test_llm_fault_with_fallback_answers_offline(harness, fault):
    await harness.configure(**{fault: 1.0})
    messages, _ = await timed(harness.stubs["fallback"].Generate(REQUEST, timeout=10))
    done = check_order(messages)
    assert done.fallback_used and done.model == "extractive"
    assert "".join(m.delta.text for m in messages[:-1]) == "Qdrant is a vector database written in Rust [1]."


async def test_client_deadline_wins_over_a_hung_llm(harness):
    await harness.configure(hang_rate=1.0)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await timed(harness.stubs["strict"].Generate(REQUEST, timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - started < 0.8
