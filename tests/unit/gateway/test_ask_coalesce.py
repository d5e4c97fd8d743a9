"""The Ask relay's time window (AskLimits.coalesce_window): deltas generation sends back to back reach the client as
one message per window, the first at once; a window of 0 relays them one for one; closing still reaches generation."""

from __future__ import annotations

import asyncio

from services.gateway.config import AskLimits
from services.gateway.deadlines import Deadline
from services.runtime.pb.ragfleet.v1 import gateway_pb2
from tests.unit.gateway.test_ask_pipeline import FakeGeneration, make, run


def kinds(events: list[gateway_pb2.AskResponse]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


async def test_back_to_back_deltas_leave_merged_after_the_first():
    generation = FakeGeneration(tokens=8)
    events = await run(make(generation=generation, limits=AskLimits(coalesce_window=0.05)), question="Q?")
    assert kinds(events) == ["sources", "delta", "delta", "finished"]
    deltas = [e.delta.text for e in events if e.HasField("delta")]
    unmerged = await run(make(generation=FakeGeneration(tokens=8)), question="Q?")  # window 0: one for one
    assert kinds(unmerged).count("delta") == 8
    assert "".join(deltas) == "".join(e.delta.text for e in unmerged if e.HasField("delta"))
    assert events[-1].finished.usage.completion_tokens == 8


async def test_deltas_slower_than_the_window_pass_one_for_one():
    generation = FakeGeneration(tokens=4, delay=0.03)
    events = await run(make(generation=generation, limits=AskLimits(coalesce_window=0.01)), question="Q?")
    assert kinds(events).count("delta") == 4


async def test_leaving_mid_stream_closes_the_generation_stream():
    generation = FakeGeneration(tokens=50, delay=0.005)
    pipeline = make(generation=generation, limits=AskLimits(coalesce_window=0.02))
    request = gateway_pb2.AskRequest(question="Q?")
    stream = pipeline.stream("t", request, pipeline.plan("t", request), Deadline(None))
    async for event in stream:
        if event.HasField("delta"):
            break
    await stream.aclose()
    await asyncio.sleep(0)
    assert generation.closed == 1
