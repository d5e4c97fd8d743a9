"""A tiny in-process server on the shared runtime, with scripted servicers, for the runtime's own tests."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from services.runtime import errors
from services.runtime.config import ServerConfig
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2,
                                             generation_pb2_grpc)
from services.runtime.serve import Binding, GrpcServer

EMBEDDING = "ragfleet.v1.EmbeddingService"
GENERATION = "ragfleet.v1.GenerationService"


def downstream_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ScriptedEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    """The first text picks the outcome, so one servicer covers every error path."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_first = 0  # answer UNAVAILABLE this many times before succeeding (retry tests)

    async def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext,
                    ) -> embedding_pb2.EmbedResponse:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise errors.Unavailable("embedding backend: warming up")
        first = request.texts[0] if request.texts else ""
        match first:
            case "":
                raise errors.InvalidArgument("texts: must hold 1 to 64 texts, got 0")
            case "overloaded":
                raise errors.Overloaded("queue full (256 texts)")
            case "down":
                raise errors.Unavailable("redis at 127.0.0.1:1 is down")
            case "bug":
                raise ValueError("unexpected shape")
            case "downstream":
                raise downstream_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return embedding_pb2.EmbedResponse(model="scripted", dimension=1,
                                           embeddings=[embedding_pb2.Embedding(values=[1.0]) for _ in request.texts])


class ScriptedGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Streams `max_tokens` deltas `delay` seconds apart; a question of "fail" breaks after two deltas."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.started = asyncio.Event()
        self.finished = 0

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        if not request.question:
            raise errors.InvalidArgument("question: must not be empty")
        count = request.params.max_tokens if request.params.HasField("max_tokens") else 3
        for i in range(count):
            self.started.set()
            if request.question == "fail" and i == 2:
                raise errors.Unavailable("llm at http://127.0.0.1:1 is down")
            yield generation_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=f"t{i} "))
            await asyncio.sleep(self.delay)
        self.finished += 1
        yield generation_pb2.GenerateResponse(finished=generation_pb2.GenerationFinished(
            finish_reason=common_pb2.FINISH_REASON_STOP))


@asynccontextmanager
async def running_server(*, embedding: ScriptedEmbedding | None = None, generation: ScriptedGeneration | None = None,
                         grace: float = 5.0, drain_notice: float = 5.0) -> AsyncIterator[GrpcServer]:
    config = ServerConfig(component="test", host="127.0.0.1", port=0, metrics_port=0, grace_seconds=grace,
                          drain_notice_seconds=drain_notice)
    server = GrpcServer(config, bindings=[
        Binding(EMBEDDING, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server, embedding or ScriptedEmbedding()),
        Binding(GENERATION, generation_pb2_grpc.add_GenerationServiceServicer_to_server,
                generation or ScriptedGeneration()),
    ])
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0)
