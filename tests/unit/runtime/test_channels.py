"""ChannelPool: one channel per target, and the retry service config that gRPC itself enforces."""

from __future__ import annotations

import json

import grpc
import pytest

from services.runtime.channels import DEFAULT_RETRY_POLICY, ChannelPool, channel_options, service_config
from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc

from .conftest import EMBEDDING, ScriptedEmbedding, running_server


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
