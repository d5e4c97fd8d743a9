"""The simulated LLM is a faithful peer for the real `openai` client: streaming, usage, embeddings, faults, control."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest

from services.cli import sim_llm


@pytest.fixture
async def sim():
    runner, port = await sim_llm.start(sim_llm.SimConfig(ttft_ms=20, tokens_per_second=500, max_tokens=12))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as control:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="test", max_retries=0, timeout=5.0)
        try:
            yield client, control
        finally:
            await client.close()
            await runner.cleanup()


async def _stats(control: httpx.AsyncClient) -> dict:
    return (await control.get("/_sim/stats")).json()


async def test_chat_stream_with_usage(sim):
    client, control = sim
    stream = await client.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hello there"}], stream=True,
        stream_options={"include_usage": True}, max_tokens=8)
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    answer = "".join(text)
    assert answer.startswith("According") and "[1]" in answer
    assert len(answer.split()) == 8 and finish == "length"
    assert usage.completion_tokens == 8 and usage.prompt_tokens == 2 and usage.total_tokens == 10
    stats = await _stats(control)
    assert stats["stream_requests"] == 1 and stats["completed_streams"] == 1 and stats["active_streams"] == 0
    assert stats["last_chat_request"]["model"] == "m1"


async def test_non_streaming_and_deterministic(sim):
    client, _ = sim
    replies = [await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
               for _ in range(2)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].choices[0].finish_reason == "stop" and replies[0].usage.completion_tokens == 12


async def test_ttft_and_tokens_per_second(sim):
    client, control = sim
    await control.post("/_sim/config", json={"ttft_ms": 150, "tokens_per_second": 50, "max_tokens": 6})
    started = time.perf_counter()
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}],
                                                  stream=True)
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - started)
    assert 0.14 <= arrivals[0] < 0.6
    # 5 gaps of 20 ms each after the first token.
    assert 0.09 <= arrivals[-1] - arrivals[0] < 0.6


async def test_embeddings_float_and_base64(sim):
    client, control = sim
    reply = await client.embeddings.create(model="e", input=["alpha", "beta", "alpha"])  # openai asks for base64
    vectors = [np.array(d.embedding) for d in reply.data]
    assert len(vectors) == 3 and vectors[0].shape == (384,)
    assert np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    assert abs(np.linalg.norm(vectors[1]) - 1) < 1e-5
    plain = await client.embeddings.create(model="e", input="alpha", encoding_format="float")
    assert np.allclose(plain.data[0].embedding, vectors[0], atol=1e-6)
    stats = await _stats(control)
    assert stats["embedding_requests"] == 2 and stats["embedding_inputs"] == 4 and stats["max_embedding_batch"] == 3


async def test_failure_rate_is_a_500(sim):
    client, control = sim
    await control.post("/_sim/config", json={"failure_rate": 1.0})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
    assert (await _stats(control))["failures_injected"] == 1


async def test_hang_times_out_and_frees_the_handler(sim):
    client, control = sim
    await control.post("/_sim/config", json={"hang_rate": 1.0})
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True,
                                             timeout=0.3)
    assert (await _stats(control))["hangs_injected"] == 1


async def test_client_disconnect_mid_stream_is_seen(sim):
    client, control = sim
    await control.post("/_sim/config", json={"tokens_per_second": 20, "max_tokens": 100})
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}],
                                                  stream=True)
    got = 0
    async for chunk in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    for _ in range(50):
        stats = await _stats(control)
        if stats["disconnects"] == 1 and stats["active_streams"] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["disconnects"] == 1 and stats["active_streams"] == 0 and stats["completed_streams"] == 0


async def test_break_after_tokens_drops_the_connection(sim):
    client, control = sim
    await control.post("/_sim/config", json={"break_after_tokens": 3})
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}],
                                                  stream=True)
    got = []
    with pytest.raises(Exception):
        async for chunk in stream:
            got.extend(c.delta.content for c in chunk.choices if c.delta.content)
    assert len(got) == 3
    assert (await _stats(control))["breaks_injected"] == 1


async def test_rate_limit_is_a_429_with_retry_after(sim):
    client, control = sim
    await control.post("/_sim/config", json={"rate_limit_rate": 1.0, "retry_after_seconds": 1.5})
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
    headers = limited.value.response.headers
    assert headers["retry-after"] == "2" and headers["retry-after-ms"] == "1500"
    assert limited.value.code == "rate_limit_exceeded"
    assert (await _stats(control))["rate_limits_injected"] == 1


async def _raw_stream(control: httpx.AsyncClient) -> tuple[bytes, BaseException | None]:
    """The raw SSE body of one streamed chat request, and the error that ended reading it (if any)."""
    body, error = b"", None
    try:
        async with control.stream("POST", "/v1/chat/completions", json={
                "model": "m", "stream": True, "messages": [{"role": "user", "content": "q"}]}) as reply:
            assert reply.status_code == 200
            async for piece in reply.aiter_raw():
                body += piece
    except httpx.HTTPError as exc:
        error = exc
    return body, error


@pytest.mark.parametrize("after", [0, 3])
async def test_reset_after_tokens_aborts_the_connection(sim, after):
    _, control = sim
    await control.post("/_sim/config", json={"reset_after_tokens": after})
    body, error = await _raw_stream(control)
    assert body.count(b'"content"') == after and b"[DONE]" not in body
    assert isinstance(error, (httpx.ReadError, httpx.RemoteProtocolError)), error
    assert (await _stats(control))["resets_injected"] == 1


@pytest.mark.parametrize("after", [0, 2])
async def test_malformed_after_tokens_sends_an_event_that_is_not_json(sim, after):
    client, control = sim
    await control.post("/_sim/config", json={"malformed_after_tokens": after})
    body, error = await _raw_stream(control)
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert error is None and len(events) == after + 2 and events[-1] == b"data: [DONE]"
    bad = events[-2].removeprefix(b"data: ")
    with pytest.raises(ValueError):
        json.loads(bad)
    assert (await _stats(control))["malformed_injected"] == 1
    with pytest.raises(Exception):  # the openai client cannot read it either
        async for _ in await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}],
                                                            stream=True):
            pass


async def test_control_endpoints(sim):
    _, control = sim
    assert (await control.post("/_sim/config", json={"nope": 1})).status_code == 400
    assert (await control.post("/_sim/config", json={"ttft_ms": 5})).json()["ttft_ms"] == 5.0
    assert (await control.get("/v1/models")).json()["data"][0]["id"] == "sim-llm"
    await control.post("/_sim/reset")
    assert (await _stats(control))["chat_requests"] == 0


def test_ragfleet_sim_llm_command_serves_on_a_free_port():
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "services.cli", "sim-llm", "--port", "0", "--ttft-ms", "5",
                                "--failure-rate", "0", "--model", "cli-model"],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("sim-llm listening on http://127.0.0.1:")
        url = line.split()[-1]
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=5)
        assert client.models.list().data[0].id == "cli-model"
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "q"}], max_tokens=3)
        assert reply.choices[0].message.content.startswith("According")
    finally:
        process.terminate()
        process.wait(10)


# -- protocol details the openai client (and raw HTTP clients) depend on --------------------------------------------

_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize("content, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": []}', "messages"),
], ids=["not-json", "not-an-object", "no-messages", "empty-messages"])
async def test_a_bad_chat_request_is_an_openai_400(sim, content, param):
    _, control = sim
    reply = await control.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == _ERROR_KEYS and error["type"] == "invalid_request_error" and error["param"] == param
    assert (await _stats(control))["chat_requests"] == 0


async def test_a_bad_embeddings_body_is_an_openai_400(sim):
    _, control = sim
    reply = await control.post("/v1/embeddings", content=b"nope", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and set(reply.json()["error"]) == _ERROR_KEYS


async def test_errors_carry_the_full_openai_shape(sim):
    client, control = sim
    with pytest.raises(openai.BadRequestError) as bad:
        await client.embeddings.create(model="e", input=[])
    assert bad.value.param == "input" and set(bad.value.body) == _ERROR_KEYS
    await control.post("/_sim/config", json={"failure_rate": 1.0})
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
    assert failed.value.code == "sim_failure" and set(failed.value.body) == _ERROR_KEYS


async def test_unknown_routes_are_json_404s_and_models_can_be_retrieved(sim):
    client, control = sim
    reply = await control.get("/v1/nope")
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"
    assert (await client.models.retrieve("sim-llm")).id == "sim-llm"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-nope")
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_max_completion_tokens_finishes_with_length(sim, stream):
    client, _ = sim
    kwargs = {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 3}
    if not stream:
        reply = await client.chat.completions.create(**kwargs)
        assert len(reply.choices[0].message.content.split()) == 3 and reply.choices[0].finish_reason == "length"
        return
    finish = None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
    assert finish == "length"


def test_sim_llm_on_a_taken_port_is_a_one_line_error(capsys):
    import argparse
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        parser = argparse.ArgumentParser()
        sim_llm.add_arguments(parser)
        args = parser.parse_args(["--port", str(busy.getsockname()[1])])
        assert sim_llm.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("sim-llm: cannot listen on 127.0.0.1:") and err.count("\n") == 1
