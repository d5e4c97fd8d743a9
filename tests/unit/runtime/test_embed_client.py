"""EmbedClient against a real grpc.aio EmbeddingService: replies, query vectors, the dimension check, errors named
after the embedding service, and gRPC's own retry of Embed."""

from __future__ import annotations

import numpy as np
import pytest

from services.runtime import errors
from services.runtime.channels import ChannelPool
from services.runtime.embed_client import EmbedClient
from services.runtime.pb.ragfleet.v1 import common_pb2

from .conftest import ScriptedEmbedding, running_server

QUERY = common_pb2.INPUT_TYPE_QUERY


async def test_embed_and_embed_query_and_embed_is_retried_by_grpc() -> None:
    servicer = ScriptedEmbedding()
    servicer.fail_first = 2  # UNAVAILABLE twice: the channel's retryPolicy retries Embed
    async with running_server(embedding=servicer) as server:
        pool = ChannelPool()
        try:
            client = EmbedClient(pool, f"127.0.0.1:{server.port}", timeout=5, dimension=1)
            vector = await client.embed_query("why do bees swarm?")
            assert vector.dtype == np.float32 and vector.tolist() == [1.0]
            assert servicer.calls == 3
            reply = await client.embed(["a", "b"], input_type=common_pb2.INPUT_TYPE_DOCUMENT, timeout=5)
            assert reply.model == "scripted" and len(reply.embeddings) == 2
        finally:
            await pool.close()


async def test_a_reply_of_another_dimension_is_refused_naming_the_setting() -> None:
    async with running_server() as server:
        pool = ChannelPool()
        try:
            client = EmbedClient(pool, f"127.0.0.1:{server.port}", timeout=5, dimension=384,
                                 dimension_setting="RAGFLEET_RETRIEVAL_DIMENSION")
            with pytest.raises(errors.FailedPrecondition, match=r"dimension 1 .*expected dimension 384 "
                                                                r"\(RAGFLEET_RETRIEVAL_DIMENSION\)"):
                await client.embed_query("q")
            unchecked = EmbedClient(pool, f"127.0.0.1:{server.port}")  # the gateway's: no dimension to hold
            assert (await unchecked.embed(["q"], input_type=QUERY, timeout=5)).dimension == 1
        finally:
            await pool.close()


@pytest.mark.parametrize(("text", "error", "message"), [
    ("down", errors.Unavailable, "embedding service: redis at 127.0.0.1:1 is down"),
    ("overloaded", errors.Overloaded, "embedding service: queue full"),
    ("", errors.InvalidArgument, "embedding service: texts: must hold"),
])
async def test_failures_become_domain_errors_naming_the_embedding_service(text: str, error: type,
                                                                          message: str) -> None:
    async with running_server() as server:
        pool = ChannelPool()
        try:
            client = EmbedClient(pool, f"127.0.0.1:{server.port}", timeout=5)
            with pytest.raises(error) as raised:
                await client.embed([text] if text else [], input_type=QUERY)
            assert raised.value.message.startswith(message)
        finally:
            await pool.close()
