"""The OpenAI backend with the real `openai` client against the simulated LLM: streaming, usage, retries only
before the first token, timeouts, the caller's deadline, and cancellation reaching the HTTP request."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.generation.base import Delta, Done, LLMStreamError, LLMUnavailable
from services.generation.config import GenerationConfig, LLMConfig, LLMTimeouts
from services.generation.llm import OpenAIAnswerer
from services.generation.prompt import PromptBuilder, TokenCounter
from services.runtime.config import ServerConfig
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

COUNTER = TokenCounter()


def make(control, **kw) -> tuple[OpenAIAnswerer, GenerationConfig]:
    llm = LLMConfig(base_url=control.llm_url, default_model="sim-model",
                    timeouts=LLMTimeouts(connect=1.0, first_token=kw.pop("first_token", 2.0), read=2.0),
                    retry_backoff=kw.pop("retry_backoff", 0.01), **kw)
    config = GenerationConfig(server=ServerConfig("generation"), llm=llm)
    return OpenAIAnswerer(llm, COUNTER), config


async def prompt_for(config: GenerationConfig, **params):
    request = generation_pb2.GenerateRequest(
        question="What is Qdrant?", passages=[common_pb2.Passage(number=1, text="Qdrant is a vector database.")],
        params=common_pb2.GenerationParams(**params))
    return await PromptBuilder(config, COUNTER).build(request)


async def test_streams_deltas_then_done_with_upstream_usage(sim):
    answerer, config = make(sim)
    try:
        prompt = await prompt_for(config, max_tokens=6, temperature=0.5, stop=["zzz"])
        events = [e async for e in answerer.stream(prompt)]
    finally:
        await answerer.close()
    deltas, done = events[:-1], events[-1]
    assert all(isinstance(d, Delta) for d in deltas) and len(deltas) == 6
    assert "".join(d.text for d in deltas).startswith("According")
    assert isinstance(done, Done) and done.finish_reason == "length" and done.model == "sim-model"
    body = (await sim.stats())["last_chat_request"]
    assert done.completion_tokens == 6 and done.prompt_tokens == sum(len(m["content"].split())
                                                                     for m in body["messages"])
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["temperature"], body["stop"]) == ("sim-model", 6, 0.5, ["zzz"])
    assert body["messages"][-1]["content"].startswith("Sources:\n\n[1]")


async def test_failures_before_first_token_are_retried_then_reported(sim):
    await sim.configure(**{"failure_rate": 1.0})
    answerer, config = make(sim, max_retries=2)
    try:
        with pytest.raises(LLMUnavailable, match=r"LLM at http://127.0.0.1:\d+/v1 .*HTTP 500.* after 3 attempt"):
            async for _ in answerer.stream(await prompt_for(config)):
                pass
    finally:
        await answerer.close()
    assert (await sim.stats())["chat_requests"] == 3


async def test_a_retry_can_succeed(sim):
    await sim.configure(**{"failure_rate": 1.0})
    answerer, config = make(sim, max_retries=1, retry_backoff=0.4)
    prompt = await prompt_for(config)

    async def heal():
        while (await sim.stats())["chat_requests"] < 1:
            await asyncio.sleep(0.01)
        await sim.configure(**{"failure_rate": 0.0})

    try:
        healer = asyncio.create_task(heal())
        events = [e async for e in answerer.stream(prompt)]
        await healer
    finally:
        await answerer.close()
    assert isinstance(events[-1], Done) and (await sim.stats())["chat_requests"] == 2


async def test_no_retry_once_tokens_were_sent(sim):
    await sim.configure(**{"break_after_tokens": 3})
    answerer, config = make(sim, max_retries=3)
    got = []
    try:
        with pytest.raises(LLMStreamError, match="failed mid-stream"):
            async for event in answerer.stream(await prompt_for(config)):
                got.append(event)
    finally:
        await answerer.close()
    assert len(got) == 3 and (await sim.stats())["chat_requests"] == 1


async def test_hang_hits_the_first_token_timeout(sim):
    await sim.configure(**{"hang_rate": 1.0})
    answerer, config = make(sim, max_retries=1, first_token=0.3)
    started = time.perf_counter()
    try:
        with pytest.raises(LLMUnavailable, match="no first token in time after 2 attempt"):
            async for _ in answerer.stream(await prompt_for(config)):
                pass
    finally:
        await answerer.close()
    assert 0.6 <= time.perf_counter() - started < 1.5
    assert (await sim.stats())["hangs_injected"] == 2


async def test_caller_deadline_bounds_the_wait(sim):
    await sim.configure(**{"hang_rate": 1.0})
    answerer, config = make(sim, max_retries=5, first_token=5.0)
    prompt = await prompt_for(config)
    prompt.deadline = asyncio.get_running_loop().time() + 0.25
    started = time.perf_counter()
    try:
        with pytest.raises(LLMUnavailable):
            async for _ in answerer.stream(prompt):
                pass
    finally:
        await answerer.close()
    assert time.perf_counter() - started < 0.6


async def test_cancel_mid_stream_closes_the_http_request(sim):
    await sim.configure(**{"tokens_per_second": 20, "max_tokens": 200})
    answerer, config = make(sim)
    got = asyncio.Event()

    async def consume():
        async for event in answerer.stream(await prompt_for(config)):
            if isinstance(event, Delta):
                got.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(got.wait(), 2)
        assert (await sim.stats())["active_streams"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s = await sim.wait_disconnected()
        assert s["disconnects"] == 1 and s["active_streams"] == 0 and s["completed_streams"] == 0
    finally:
        await answerer.close()


async def test_summarise_uses_the_summary_model_and_caches(sim):
    answerer, _ = make(sim, summary_model="sim-summary")
    turns = [{"role": "user", "content": "my name is Ada"}, {"role": "assistant", "content": "Hello Ada"}]
    try:
        first = await answerer.summarise(turns, 50)
        second = await answerer.summarise(turns, 50)
    finally:
        await answerer.close()
    s = await sim.stats()
    assert first and first == second and s["chat_requests"] == 1
    assert s["last_chat_request"]["model"] == "sim-summary" and "my name is Ada" in str(s["last_chat_request"])


async def test_failed_summary_returns_none(sim):
    await sim.configure(**{"failure_rate": 1.0})
    answerer, _ = make(sim, summary_model="sim-summary")
    try:
        assert await answerer.summarise([{"role": "user", "content": "x"}], 50) is None
    finally:
        await answerer.close()
