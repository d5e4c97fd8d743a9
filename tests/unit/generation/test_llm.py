"""The OpenAI backend with the real `openai` client against the simulated LLM: streaming, usage, retries only
before the first token, timeouts, the caller's deadline, and cancellation reaching the HTTP request. SSE details
the sim never sends (comments, multi-line data, CRLF, error events, malformed data, no [DONE]) come from a scripted
HTTP peer that writes exact bytes."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from services.generation.base import Delta, Done, LLMStreamError, LLMUnavailable
from services.generation.config import GenerationConfig, LLMConfig, LLMTimeouts
from services.generation import llm
from services.generation.llm import OpenAIAnswerer
from services.generation.prompt import PromptBuilder, TokenCounter
from services.runtime.config import ServerConfig
from services.runtime.errors import DeadlineExceeded
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

COUNTER = TokenCounter()


def make(control, **kw) -> tuple[OpenAIAnswerer, GenerationConfig]:
    llm = LLMConfig(base_url=control.llm_url, default_model="sim-model",
                    timeouts=LLMTimeouts(connect=kw.pop("connect", 1.0), first_token=kw.pop("first_token", 2.0),
                                         read=kw.pop("read", 2.0)),
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


async def test_concurrent_streams_wait_for_a_connection_only_when_the_pool_is_smaller(sim):
    # 6 streams at once, each 0.1 s to its first token and ~0.6 s long. With a connection per stream every first
    # token arrives at about the sim's TTFT; with 2 connections the last streams wait for earlier ones to finish.
    await sim.configure(ttft_ms=100.0, tokens_per_second=10.0, max_tokens=6)

    async def first_tokens(connections: int) -> list[float]:
        answerer, config = make(sim, max_connections=connections)
        prompt = await prompt_for(config)

        async def one() -> float:
            started = time.perf_counter()
            first = 0.0
            async for event in answerer.stream(prompt):
                if isinstance(event, Delta) and not first:
                    first = time.perf_counter() - started
            return first

        try:
            return sorted(await asyncio.gather(*(one() for _ in range(6))))
        finally:
            await answerer.close()

    pooled = await first_tokens(6)
    assert pooled[-1] < 0.4, pooled
    starved = await first_tokens(2)
    assert starved[-1] > 0.9, starved


async def test_waiting_for_a_pooled_connection_is_not_a_connect_timeout(sim):
    # One connection, two streams of ~0.6 s: the second waits ~0.6 s for the connection, longer than the 0.2 s
    # connect timeout but well inside its 5 s first-token budget. It must get through on its first attempt.
    await sim.configure(ttft_ms=50.0, tokens_per_second=10.0, max_tokens=6)
    answerer, config = make(sim, max_connections=1, connect=0.2, first_token=5.0, max_retries=0)
    prompt = await prompt_for(config)

    async def answer() -> list:
        return [event async for event in answerer.stream(prompt)]

    try:
        answers = await asyncio.gather(answer(), answer())
    finally:
        await answerer.close()
    assert all(isinstance(events[-1], Done) for events in answers)  # max_retries=0: a timeout would have failed


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
        with pytest.raises(DeadlineExceeded, match="deadline passed before the LLM"):
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


# -- a scripted peer: exact SSE bytes, each piece its own write ------------------------------------------------------

BREAK = b"<drop the connection>"
PAUSE = b"<stay silent for 1 s>"


class Scripted:
    """An HTTP server whose Nth chat request gets the Nth script (a list of byte pieces, written 5 ms apart)."""

    def __init__(self, scripts: list[list[bytes]]) -> None:
        self.scripts = scripts
        self.requests = 0
        self.peers: list[tuple] = []
        self.llm_url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        script = self.scripts[min(self.requests, len(self.scripts) - 1)]
        self.requests += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in script:
            if piece is BREAK:
                request.transport.close()  # type: ignore[union-attr]
                return response
            if piece is PAUSE:
                await asyncio.sleep(1.0)
                continue
            await response.write(piece)
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response


@pytest.fixture(params=["aiohttp", "httpx2"])
async def scripted(request, monkeypatch):
    """Every scripted test runs on both body readers: aiohttp's stream read directly (what the SDK's aiohttp transport
    gives), and httpx2's aiter_bytes (any other transport); they must not differ in anything a caller sees."""
    if request.param == "httpx2":
        monkeypatch.setattr(llm, "AiohttpResponseStream", None)
    servers: list[web.AppRunner] = []

    async def start(*scripts: list[bytes]) -> Scripted:
        peer = Scripted(list(scripts))
        app = web.Application()
        app.router.add_post("/v1/chat/completions", peer.chat)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        servers.append(runner)
        peer.llm_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        return peer

    try:
        yield start
    finally:
        for runner in servers:
            await runner.cleanup()


def data(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def content(text: str, finish: str | None = None) -> bytes:
    return data({"id": "c", "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


DONE_BYTES = b"data: [DONE]\n\n"


async def run(peer: Scripted, **kw) -> tuple[list, BaseException | None]:
    answerer, config = make(peer, **kw)
    got: list = []
    try:
        async for event in answerer.stream(await prompt_for(config)):
            got.append(event)
    except Exception as exc:  # noqa: BLE001 - returned for the assertions
        return got, exc
    finally:
        await answerer.close()
    return got, None


async def test_sse_comments_multiline_data_and_crlf_through_the_client(scripted):
    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    peer = await scripted([
        b": connected\r\n\r\n",
        data({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}),
        b'data: {"choices": [{"index": 0,\r\ndata: "delta": {"content": "Hel"}}]}\r\n\r', b"\n",
        content("lo"), b": ping\n\n", content(" [1]", finish="stop"),
        data({"choices": [], "usage": usage}), DONE_BYTES])
    events, error = await run(peer)
    assert error is None
    assert [e.text for e in events[:-1]] == ["Hel", "lo", " [1]"]
    assert events[-1] == Done("stop", 11, 3, "sim-model")


async def test_body_ending_without_done_or_usage_still_finishes(scripted):
    peer = await scripted([content("one"), content(" two", finish="length")])
    events, error = await run(peer)
    assert error is None and [e.text for e in events[:-1]] == ["one", " two"]
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 2  # counted locally


async def test_malformed_json_mid_stream_is_a_stream_error_not_retried(scripted):
    peer = await scripted([content("one"), content(" two"), b'data: {"choices": [\n\n', DONE_BYTES])
    events, error = await run(peer, max_retries=3)
    assert [e.text for e in events] == ["one", " two"]
    assert isinstance(error, LLMStreamError) and "failed mid-stream: MalformedEvent" in str(error)
    assert peer.requests == 1


async def test_malformed_json_before_the_first_token_is_not_retried(scripted):
    peer = await scripted([b"data: not json\n\n"])
    _, error = await run(peer, max_retries=3)
    assert isinstance(error, LLMUnavailable) and "after 1 attempt" in str(error) and peer.requests == 1


async def test_error_event_before_the_first_token_is_retried_like_the_sdk_error(scripted):
    failing = [b'event: error\ndata: {"error": {"message": "model overloaded"}}\n\n']
    peer = await scripted(failing, failing)
    _, error = await run(peer, max_retries=1)
    assert isinstance(error, LLMUnavailable), error
    assert "APIError: model overloaded after 2 attempt(s)" in str(error) and peer.requests == 2


async def test_error_event_mid_stream_ends_the_answer(scripted):
    peer = await scripted([content("partial"), data({"error": {"message": "upstream died"}}), DONE_BYTES])
    events, error = await run(peer, max_retries=3)
    assert [e.text for e in events] == ["partial"]
    assert isinstance(error, LLMStreamError) and "APIError: upstream died" in str(error) and peer.requests == 1


async def test_connection_is_reused_after_done(scripted):
    stream = [content("a", finish="stop"), DONE_BYTES]
    peer = await scripted(stream, stream)
    answerer, config = make(peer)
    try:
        for _ in range(2):
            events = [e async for e in answerer.stream(await prompt_for(config))]
            assert isinstance(events[-1], Done)
    finally:
        await answerer.close()
    assert peer.peers[0] == peer.peers[1]  # the body was read to its end, so the pool kept the connection


async def test_connection_lost_before_the_first_token_is_retried(scripted):
    broken = [data({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}), BREAK]
    peer = await scripted(broken, [content("ok", finish="stop"), DONE_BYTES])
    events, error = await run(peer, max_retries=1)
    assert error is None and [e.text for e in events[:-1]] == ["ok"] and peer.requests == 2


async def test_silence_past_the_read_timeout_mid_stream_is_a_stream_error(scripted):
    peer = await scripted([content("one"), PAUSE, content(" two"), DONE_BYTES])
    started = time.perf_counter()
    events, error = await run(peer, read=0.3, max_retries=3)
    assert [e.text for e in events] == ["one"] and time.perf_counter() - started < 0.9
    assert isinstance(error, LLMStreamError) and "APITimeoutError" in str(error) and peer.requests == 1


async def test_connection_lost_mid_stream_is_a_stream_error(scripted):
    peer = await scripted([content("one"), BREAK])
    events, error = await run(peer, max_retries=3)
    assert [e.text for e in events] == ["one"] and peer.requests == 1
    assert isinstance(error, LLMStreamError) and "failed mid-stream: APIConnectionError" in str(error), error


async def test_the_sdk_aiohttp_transport_body_is_read_directly(sim, monkeypatch):
    """The fast path is the one taken in production (services.runtime.openai_client builds the aiohttp transport)."""
    taken: list[bool] = []
    real = llm._aiohttp_body
    monkeypatch.setattr(llm, "_aiohttp_body", lambda response: taken.append(True) or real(response))
    monkeypatch.setattr(llm, "_httpx_chunks", None)  # would fail if called
    answerer, config = make(sim)
    try:
        events = [e async for e in answerer.stream(await prompt_for(config, max_tokens=3))]
    finally:
        await answerer.close()
    assert taken and len(events) == 4 and isinstance(events[-1], Done)


async def _generate_under_a_server_span(sim) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    answerer, config = make(sim)
    try:
        prompt = await prompt_for(config, max_tokens=4)
        with trace.get_tracer("test").start_as_current_span("Generate", kind=SpanKind.SERVER):
            events = [e async for e in answerer.stream(prompt)]
    finally:
        await answerer.close()
    assert isinstance(events[-1], Done)


async def test_without_client_spans_the_llm_call_is_told_on_the_generate_span(sim, span_exporter, monkeypatch):
    from services.runtime import telemetry
    monkeypatch.setattr(telemetry, "_client_spans", False)
    await _generate_under_a_server_span(sim)
    recorded = span_exporter.get_finished_spans()
    assert [s.name for s in recorded] == ["Generate"], "no span of its own for the chat call"
    attributes = recorded[0].attributes
    assert attributes["gen_ai.request.model"] == "sim-model"
    assert attributes["gen_ai.usage.output_tokens"] == 4 and attributes["gen_ai.usage.input_tokens"] > 0
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("length",)


async def test_with_client_spans_the_llm_call_has_its_chat_span(sim, span_exporter, monkeypatch):
    from opentelemetry.trace import SpanKind
    from services.runtime import telemetry
    monkeypatch.setattr(telemetry, "_client_spans", True)
    await _generate_under_a_server_span(sim)
    chat, parent = span_exporter.get_finished_spans()
    assert (chat.name, chat.kind, parent.name) == ("chat sim-model", SpanKind.CLIENT, "Generate")
    assert chat.parent.span_id == parent.context.span_id
    assert chat.attributes["gen_ai.usage.output_tokens"] == 4 and chat.attributes["server.address"] == sim.llm_url
    assert "gen_ai.request.model" not in parent.attributes
