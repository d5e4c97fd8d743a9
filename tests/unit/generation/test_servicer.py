"""GenerationService over real gRPC in-process: statuses, stream order, fallback, admission, cancellation."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from services.generation.config import GenerationConfig, Limits, LLMConfig, LLMTimeouts, PromptBudget
from services.generation.server import build
from services.runtime.config import ServerConfig
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.runtime.serve import GrpcServer

PASSAGES = [
    common_pb2.Passage(number=1, title="Qdrant", text="Qdrant is a vector database written in Rust.", score=0.9),
    common_pb2.Passage(number=2, title="Redis", text="Redis keeps data in memory.", score=0.4),
]


def request(question="Which language is Qdrant written in?", **kw) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(question=question, passages=PASSAGES, **kw)


class Service:
    def __init__(self, config: GenerationConfig) -> None:
        self.config = config

    async def __aenter__(self) -> generation_pb2_grpc.GenerationServiceStub:
        started = await build(self.config)
        self.server = GrpcServer(self.config.server, bindings=started.bindings, on_stop=started.on_stop)
        port = await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return generation_pb2_grpc.GenerationServiceStub(self.channel)

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(grace=0.5)


def offline_config(**kw) -> GenerationConfig:
    return GenerationConfig(server=ServerConfig("generation", host="127.0.0.1", port=0, metrics_port=0), **kw)


def llm_config(sim, *, fallback: bool, **kw) -> GenerationConfig:
    llm = LLMConfig(base_url=sim.llm_url, default_model="sim-model", max_retries=1, retry_backoff=0.01,
                    timeouts=LLMTimeouts(connect=1.0, first_token=kw.pop("first_token", 2.0), read=2.0))
    return offline_config(llm=llm, fallback=fallback, **kw)


async def collect(stub, req, timeout=5.0):
    return [m async for m in stub.Generate(req, timeout=timeout)]


async def test_offline_answer_streams_deltas_then_finished():
    async with Service(offline_config()) as stub:
        messages = await collect(stub, request())
    assert all(m.HasField("delta") for m in messages[:-1]) and messages[-1].HasField("finished")
    text = "".join(m.delta.text for m in messages[:-1])
    assert text == "Qdrant is a vector database written in Rust [1]."
    done = messages[-1].finished
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP and done.model == "extractive"
    assert list(done.passages_used) == [1, 2] and not done.fallback_used
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.usage.completion_tokens > 5 and done.usage.prompt_tokens > 20


async def test_bad_input_is_invalid_argument_before_any_message():
    async with Service(offline_config()) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(question=" "))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "question: must not be empty" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(params=common_pb2.GenerationParams(max_tokens=100000)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.max_tokens" in err.value.details()


async def test_llm_answer_with_usage(sim):
    async with Service(llm_config(sim, fallback=False)) as stub:
        messages = await collect(stub, request(params=common_pb2.GenerationParams(max_tokens=5)))
    text = "".join(m.delta.text for m in messages[:-1])
    done = messages[-1].finished
    assert text.startswith("According") and len(text.split()) == 5
    assert done.model == "sim-model" and done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert done.usage.completion_tokens == 5 and not done.fallback_used


async def test_llm_down_is_unavailable_naming_the_llm(sim):
    await sim.configure(**{"failure_rate": 1.0})
    async with Service(llm_config(sim, fallback=False)) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"LLM at {sim.llm_url}" in err.value.details() and "after 2 attempt" in err.value.details()


async def test_llm_down_falls_back_when_configured(sim):
    await sim.configure(**{"failure_rate": 1.0})
    async with Service(llm_config(sim, fallback=True)) as stub:
        messages = await collect(stub, request())
    done = messages[-1].finished
    assert done.fallback_used and done.model == "extractive"
    assert "".join(m.delta.text for m in messages[:-1]).endswith("[1].")


async def test_mid_stream_break_is_unavailable_after_the_deltas(sim):
    await sim.configure(**{"break_after_tokens": 3, "tokens_per_second": 50})
    async with Service(llm_config(sim, fallback=True)) as stub:
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for m in stub.Generate(request(), timeout=5):
                got.append(m)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "mid-stream" in err.value.details()
    assert got and all(m.HasField("delta") for m in got)  # no fallback text after a partial answer
    assert (await sim.stats())["chat_requests"] == 1


async def test_overload_is_resource_exhausted_at_once(sim):
    await sim.configure(**{"tokens_per_second": 20, "max_tokens": 100})
    config = llm_config(sim, fallback=False, limits=Limits(max_concurrent=1))
    async with Service(config) as stub:
        first = stub.Generate(request(), timeout=10)
        await first.read()  # admitted and streaming
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(), timeout=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()


async def test_client_cancel_reaches_the_llm(sim):
    await sim.configure(**{"tokens_per_second": 20, "max_tokens": 200})
    async with Service(llm_config(sim, fallback=False)) as stub:
        call = stub.Generate(request(), timeout=10)
        assert (await call.read()).HasField("delta")
        call.cancel()
        stats = await sim.wait_disconnected()
    assert stats["disconnects"] == 1 and stats["active_streams"] == 0 and stats["completed_streams"] == 0


async def test_the_llm_gets_the_time_left_after_a_slow_history_summary(sim):
    # Each sim call takes 0.5 s to its first token; the summary comes first. With a 1.4 s deadline the answer's
    # first token is due at ~1.0-1.1 s: in time, unless the summary's 0.5 s is charged twice against the deadline.
    await sim.configure(ttft_ms=500.0, tokens_per_second=1000.0, max_tokens=5)
    config = llm_config(sim, fallback=False, first_token=5.0, budget=PromptBudget(history_tokens=300))
    config = replace(config, llm=replace(config.llm, summary_model="sim-summary"))
    history = [common_pb2.ChatTurn(role=role, content=f"turn {i} " + "words " * 40)
               for i in range(6) for role in (common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT)]
    async with Service(config) as stub:
        messages = await collect(stub, request(history=history), timeout=1.4)
    assert messages[-1].HasField("finished") and any(m.HasField("delta") for m in messages)
    assert (await sim.stats())["chat_requests"] == 2  # the summary, then the answer


async def test_small_context_reports_the_passages_used():
    big = [replace_text(p, " ".join(["filler"] * 400)) for p in PASSAGES]
    config = offline_config()
    config = replace(config, budget=replace(config.budget, passage_tokens=450))
    async with Service(config) as stub:
        messages = await collect(stub, generation_pb2.GenerateRequest(question="filler?", passages=big))
    assert list(messages[-1].finished.passages_used) == [1]


def replace_text(p: common_pb2.Passage, text: str) -> common_pb2.Passage:
    out = common_pb2.Passage()
    out.CopyFrom(p)
    out.text = text
    return out
