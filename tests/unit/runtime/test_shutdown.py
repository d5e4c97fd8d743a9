"""Graceful drain: health flips to NOT_SERVING at once, in-flight streams finish within the grace period."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from .conftest import EMBEDDING, GENERATION, ScriptedGeneration, running_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def test_health_and_reflection_list_every_service() -> None:
    async with running_server() as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for service in ("", EMBEDDING, GENERATION):
                assert await _status(channel, service) == SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def requests():
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = set()
            async for reply in stub.ServerReflectionInfo(requests(), timeout=2):
                names |= {s.name for s in reply.list_services_response.service}
            assert {EMBEDDING, GENERATION, "grpc.health.v1.Health"} <= names


async def test_stop_drains_an_in_flight_stream_while_health_says_not_serving() -> None:
    generation = ScriptedGeneration(delay=0.1)
    async with running_server(generation=generation, grace=5.0) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            call = stub.Generate(generation_pb2.GenerateRequest(
                question="q", params=common_pb2.GenerationParams(max_tokens=15)), timeout=10)
            received: list[generation_pb2.GenerateResponse] = []

            async def consume() -> None:
                async for message in call:
                    received.append(message)

            consumer = asyncio.create_task(consume())
            await asyncio.wait_for(generation.started.wait(), 5)
            started = time.monotonic()
            stopper = asyncio.create_task(server.stop())
            await asyncio.sleep(0.2)
            # Draining: the server still answers health checks, and says it should get no new traffic.
            assert not stopper.done()
            assert await _status(channel) == NOT_SERVING
            assert await _status(channel, GENERATION) == NOT_SERVING
            await asyncio.wait_for(consumer, 5)
            await asyncio.wait_for(stopper, 5)
            elapsed = time.monotonic() - started
    assert await call.code() == grpc.StatusCode.OK
    assert len(received) == 16 and received[-1].HasField("finished")
    assert generation.finished == 1
    assert elapsed < 5.0


async def test_stop_gives_up_on_a_stream_that_outlives_the_grace_period() -> None:
    generation = ScriptedGeneration(delay=0.2)
    async with running_server(generation=generation) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            call = stub.Generate(generation_pb2.GenerateRequest(
                question="q", params=common_pb2.GenerationParams(max_tokens=100)), timeout=30)

            async def consume() -> grpc.StatusCode:
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            consumer = asyncio.create_task(consume())
            await asyncio.wait_for(generation.started.wait(), 5)
            started = time.monotonic()
            await server.stop(grace=0.5)
            elapsed = time.monotonic() - started
            code = await asyncio.wait_for(consumer, 5)
    assert 0.4 < elapsed < 2.5
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert generation.finished == 0
