"""ChannelPool: one channel per target, and the retry service config that gRPC itself enforces."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest

from services.runtime.channels import DEFAULT_RETRY_POLICY, ChannelPool, channel_options, service_config
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2,
                                             generation_pb2_grpc)

from .conftest import EMBEDDING, GENERATION, ScriptedEmbedding, ScriptedGeneration, running_server


def test_service_config_round_robin_and_retry_only_for_listed_methods() -> None:
    plain = json.loads(service_config([]))
    assert plain == {"loadBalancingConfig": [{"round_robin": {}}]}
    config = json.loads(service_config([(EMBEDDING, "Embed")]))
    (method_config,) = config["methodConfig"]
    assert method_config["name"] == [{"service": EMBEDDING, "method": "Embed"}]
    assert method_config["retryPolicy"] == DEFAULT_RETRY_POLICY
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method_config["retryPolicy"]["maxAttempts"] <= 5


def test_channel_options_carry_the_service_config_and_message_limits() -> None:
    options = dict(channel_options([(EMBEDDING, "Embed")], max_message_mb=8))
    assert json.loads(options["grpc.service_config"])["methodConfig"]
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_receive_message_length"] == 8 * 1024 * 1024


async def test_pool_reuses_one_channel_per_target() -> None:
    pool = ChannelPool()
    first = pool.get("127.0.0.1:1")
    assert pool.get("127.0.0.1:1") is first
    assert pool.get("127.0.0.1:2") is not first
    await pool.close()
    assert pool.get("127.0.0.1:1") is not first  # closed channels are never handed out again
    await pool.close()


@pytest.mark.parametrize("retried", [True, False])
async def test_unary_unavailable_is_retried_only_when_listed(retried: bool) -> None:
    servicer = ScriptedEmbedding()
    servicer.fail_first = 2  # below maxAttempts=3
    async with running_server(embedding=servicer) as server:
        pool = ChannelPool()
        try:
            channel = pool.get(f"127.0.0.1:{server.port}", retry_methods=[(EMBEDDING, "Embed")] if retried else [])
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            request = embedding_pb2.EmbedRequest(texts=["x"])
            if retried:
                reply = await stub.Embed(request, timeout=5)
                assert reply.model == "scripted"
                assert servicer.calls == 3
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Embed(request, timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert servicer.calls == 1
        finally:
            await pool.close()


class CountingGeneration(ScriptedGeneration):
    """Records when each stream started, so a test can tell which replica took which call."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.starts: list[float] = []

    async def Generate(self, request, context):  # type: ignore[no-untyped-def, override]
        self.starts.append(time.monotonic())
        async for message in super().Generate(request, context):
            yield message


@pytest.mark.parametrize("health_checked", [True, False])
async def test_a_draining_replica_gets_no_new_streams_when_health_is_watched(health_checked: bool) -> None:
    # Two replicas behind one round-robin channel, as the gateway sees a headless Service. Replica A starts
    # draining (NOT_SERVING, then waits for its in-flight streams); every new stream must go to B meanwhile,
    # or A's in-flight count never reaches zero and its grace period ends by cancelling streams.
    a, b = CountingGeneration(delay=0.05), CountingGeneration(delay=0.05)
    async with running_server(generation=a, grace=3.0) as server_a, running_server(generation=b) as server_b:
        pool = ChannelPool()
        target = f"ipv4:127.0.0.1:{server_a.port},127.0.0.1:{server_b.port}"
        channel = pool.get(target, health_service=GENERATION if health_checked else None)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(question="q", params=common_pb2.GenerationParams(max_tokens=10))

        async def stream() -> int:
            return len([m async for m in stub.Generate(request, timeout=10)])

        try:
            for _ in range(50):  # round robin spreads calls once both subchannels are connected
                await stream()
                if a.starts and b.starts:
                    break
            assert a.starts and b.starts
            in_flight = [asyncio.create_task(stream()) for _ in range(4)]
            await asyncio.sleep(0.1)
            draining = time.monotonic()
            stop = asyncio.create_task(server_a.stop())
            await asyncio.sleep(0.2)  # the health watch reports NOT_SERVING
            later = await asyncio.gather(*(stream() for _ in range(6)))
            new_on_a = [t for t in a.starts if t > draining + 0.2]
            assert await asyncio.gather(*in_flight) == [11] * 4 and later == [11] * 6
            await stop
        finally:
            await pool.close()
    if health_checked:
        assert new_on_a == []
    else:
        assert new_on_a  # the reason for watching health: DNS/round robin alone keeps routing to A


async def test_after_the_drain_notice_even_a_client_that_ignores_health_moves_to_another_replica() -> None:
    # No health watching here (an external client behind an L4 Service). After the notice the draining replica
    # sends GOAWAY: new streams go to B without failing, and A's in-flight streams still finish.
    a, b = CountingGeneration(delay=0.05), CountingGeneration(delay=0.05)
    async with running_server(generation=a, grace=5.0, drain_notice=0.3) as server_a, \
            running_server(generation=b) as server_b:
        pool = ChannelPool()
        channel = pool.get(f"ipv4:127.0.0.1:{server_a.port},127.0.0.1:{server_b.port}")
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(question="q", params=common_pb2.GenerationParams(max_tokens=20))

        async def stream() -> int:
            return len([m async for m in stub.Generate(request, timeout=10)])

        try:
            for _ in range(50):
                await stream()
                if a.starts and b.starts:
                    break
            in_flight = [asyncio.create_task(stream()) for _ in range(4)]
            await asyncio.sleep(0.1)
            stop = asyncio.create_task(server_a.stop())
            await asyncio.sleep(0.6)  # past the notice: A has sent GOAWAY
            after_goaway = time.monotonic()
            later = await asyncio.gather(*(stream() for _ in range(6)))
            assert await asyncio.gather(*in_flight) == [21] * 4 and later == [21] * 6
            assert [t for t in a.starts if t > after_goaway] == []
            await stop
        finally:
            await pool.close()
