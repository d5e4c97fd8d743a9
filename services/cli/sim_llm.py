"""`ragfleet sim-llm`: a simulated OpenAI-compatible server for tests and benchmarks.

Speaks the real wire protocol the `openai` client uses: `POST /v1/chat/completions` (JSON or SSE streaming with
`data: {...}` chunks, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`),
`POST /v1/embeddings` (float lists or base64 float32), `GET /v1/models[/{id}]`; errors, unknown routes included,
are OpenAI's `{"error": {"message", "type", "param", "code"}}` JSON. Latency and faults are configurable:
time to first token, tokens per second, failure rate (HTTP 500 before any byte), rate-limit rate (HTTP 429 with
`Retry-After`), hang rate (accepts, never answers until the client gives up), a stream that breaks after N tokens
(connection closed mid-answer), is reset after N tokens (TCP RST), or turns malformed after N tokens (a `data:` event
that is not JSON), and a fixed + per-text cost for embeddings. A client that disconnects cancels its request here, as with a real server.

Control endpoints for tests: `GET /_sim/stats` (requests, active and completed streams, client disconnects seen
mid-stream, the last chat request), `POST /_sim/config` (change settings live), `POST /_sim/reset`.

    ragfleet sim-llm --port 8081 --ttft-ms 200 --tokens-per-second 20

Tests and benchmarks run it as its own process with `SimLLMProcess` (below).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
from aiohttp import web

_WORDS = ("the evidence in the retrieved passages indicates that this claim is supported by the reported results "
          "although further studies are needed to confirm the effect in larger cohorts").split()


def _error(message: str, *, status: int, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:
    """OpenAI's error body: the SDK reads `error.message`/`type`/`param`/`code` from it."""
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 OpenAI answers a body that is not one with."""
    try:
        body = await request.json()
    except ValueError:  # not JSON, or not UTF-8
        return _error("We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                      "your HTTP library correctly. The OpenAI API expects a JSON payload.)", status=400)
    if not isinstance(body, dict):
        return _error(f"Invalid type for request body: expected an object, got {type(body).__name__}.", status=400)
    return body


@web.middleware
async def _json_http_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own 404/405/413 are text/plain; OpenAI's are JSON error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"Invalid URL ({request.method} {request.path})" if exc.status in (404, 405) else exc.reason
        return _error(message, status=exc.status)


@dataclass
class SimConfig:
    ttft_ms: float = 50.0
    tokens_per_second: float = 200.0
    max_tokens: int = 40
    failure_rate: float = 0.0
    hang_rate: float = 0.0
    embedding_dim: int = 384
    embedding_call_ms: float = 10.0
    embedding_per_text_ms: float = 0.2
    model: str = "sim-llm"
    seed: int = 0
    break_after_tokens: int = 0  # >0: drop the connection after this many tokens (a mid-stream failure)
    rate_limit_rate: float = 0.0  # share of requests answered 429 with Retry-After (before any byte)
    retry_after_seconds: float = 1.0  # the Retry-After those 429s carry
    reset_after_tokens: int = -1  # >=0: abort the TCP connection (RST) after this many tokens; 0 = before the first
    malformed_after_tokens: int = -1  # >=0: after this many tokens send a data event that is not JSON, then stop


@dataclass
class SimStats:
    chat_requests: int = 0
    stream_requests: int = 0
    active_streams: int = 0
    completed_streams: int = 0
    disconnects: int = 0
    failures_injected: int = 0
    hangs_injected: int = 0
    breaks_injected: int = 0
    rate_limits_injected: int = 0
    resets_injected: int = 0
    malformed_injected: int = 0
    embedding_requests: int = 0
    embedding_inputs: int = 0
    max_embedding_batch: int = 0


class SimLLM:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self.last_chat_request: dict[str, Any] | None = None
        self._rng = random.Random(config.seed)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_json_http_errors])
        app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
            web.get("/_sim/stats", self.get_stats),
            web.post("/_sim/config", self.set_config),
            web.post("/_sim/reset", self.reset),
        ])
        return app

    # -- faults ---------------------------------------------------------------------------------------------------

    async def _maybe_fault(self) -> web.Response | None:
        roll = self._rng.random()
        if roll < self.config.failure_rate:
            self.stats.failures_injected += 1
            return _error("simulated failure", status=500, type_="server_error", code="sim_failure")
        if roll < self.config.failure_rate + self.config.hang_rate:
            self.stats.hangs_injected += 1
            await asyncio.sleep(3600)
        if roll < self.config.failure_rate + self.config.hang_rate + self.config.rate_limit_rate:
            self.stats.rate_limits_injected += 1
            wait = max(self.config.retry_after_seconds, 0.0)
            response = _error("Rate limit reached for requests (simulated)", status=429, type_="requests",
                              code="rate_limit_exceeded")
            # OpenAI sends both: whole seconds (RFC 9110) and the precise wait the SDK prefers.
            response.headers["Retry-After"] = str(math.ceil(wait))
            response.headers["retry-after-ms"] = str(int(wait * 1000))
            return response
        return None

    # -- chat -----------------------------------------------------------------------------------------------------

    def _answer_tokens(self, body: dict[str, Any]) -> list[str]:
        """Deterministic text that depends on the prompt, cites passage [1], and honours max_tokens."""
        messages = body.get("messages") or []
        last_user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        digest = int(hashlib.sha256(str(last_user).encode()).hexdigest(), 16)
        limit = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.config.max_tokens)
        limit = min(limit, self.config.max_tokens)
        words = [_WORDS[(digest >> (i % 200)) % len(_WORDS)] if i else "According" for i in range(limit)]
        if limit >= 3:
            words[2] = "[1]"
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error("'messages' is a required property and must be a non-empty array", status=400,
                          param="messages")
        self.stats.chat_requests += 1
        self.last_chat_request = body
        fault = await self._maybe_fault()
        if fault is not None:
            return fault
        tokens = self._answer_tokens(body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
        requested = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "length" if requested and len(tokens) >= int(requested) else "stop"
        created = int(time.time())
        completion_id = f"chatcmpl-sim{self.stats.chat_requests}"
        model = body.get("model") or self.config.model
        await asyncio.sleep(self.config.ttft_ms / 1000)
        if not body.get("stream"):
            await asyncio.sleep(len(tokens) / max(self.config.tokens_per_second, 1e-6))
            return web.json_response({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": "".join(tokens)}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                          "total_tokens": prompt_tokens + len(tokens)},
            })
        self.stats.stream_requests += 1
        self.stats.active_streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)

            async def send(payload: dict[str, Any] | str) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                await response.write(f"data: {data}\n\n".encode())

            base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
            interval = 1.0 / max(self.config.tokens_per_second, 1e-6)
            for i, token in enumerate(tokens):
                if i:
                    await asyncio.sleep(interval)
                if i and i == self.config.break_after_tokens:
                    self.stats.breaks_injected += 1
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if i == self.config.reset_after_tokens:
                    self.stats.resets_injected += 1
                    _reset(request)
                    return response
                if i == self.config.malformed_after_tokens:
                    self.stats.malformed_injected += 1
                    await response.write(b'data: {"choices": [{"delta": {"content": \n\n')  # cut JSON
                    await response.write(b"data: [DONE]\n\n")
                    await response.write_eof()
                    return response
                delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
                await send({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                await send({**base, "choices": [], "usage": {
                    "prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                    "total_tokens": prompt_tokens + len(tokens)}})
            await send("[DONE]")
            await response.write_eof()
            self.stats.completed_streams += 1
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away mid-stream: this is what cancellation tests look for.
            self.stats.disconnects += 1
            raise
        finally:
            self.stats.active_streams -= 1
        return response

    # -- embeddings -----------------------------------------------------------------------------------------------

    def _vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vec = np.random.default_rng(seed).standard_normal(self.config.embedding_dim).astype(np.float32)
        return vec / np.linalg.norm(vec)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _error("input must be a string or a list of strings", status=400, param="input")
        self.stats.embedding_requests += 1
        self.stats.embedding_inputs += len(inputs)
        self.stats.max_embedding_batch = max(self.stats.max_embedding_batch, len(inputs))
        fault = await self._maybe_fault()
        if fault is not None:
            return fault
        await asyncio.sleep((self.config.embedding_call_ms + self.config.embedding_per_text_ms * len(inputs)) / 1000)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vec = self._vector(text)
            embedding: Any = base64.b64encode(vec.tobytes()).decode() if as_base64 else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(t.split()) for t in inputs)
        return web.json_response({"object": "list", "data": data, "model": body.get("model") or self.config.model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- control --------------------------------------------------------------------------------------------------

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.config.model, "object": "model", "created": 0, "owned_by": "ragfleet"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.config.model:
            return _error(f"The model '{name}' does not exist", status=404, param="model", code="model_not_found")
        return web.json_response(self._model_object())

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response({**asdict(self.stats), "config": asdict(self.config),
                                  "last_chat_request": self.last_chat_request})

    async def set_config(self, request: web.Request) -> web.Response:
        changes = await request.json()
        known = {f.name: f.type for f in fields(SimConfig)}
        for key, value in changes.items():
            if key not in known:
                return web.json_response({"error": f"unknown setting {key!r}"}, status=400)
            setattr(self.config, key, type(getattr(self.config, key))(value))
        return web.json_response(asdict(self.config))

    async def reset(self, request: web.Request) -> web.Response:
        self.stats = SimStats()
        self.last_chat_request = None
        return web.json_response({"ok": True})


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed server or a middlebox would."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def start(config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start in the running loop; returns the runner (call `cleanup()` to stop) and the bound port."""
    # handler_cancellation: a client that disconnects cancels its handler (ends a hang, counts a stream disconnect).
    runner = web.AppRunner(SimLLM(config).app(), access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound


class SimLLMProcess:
    """`ragfleet sim-llm` as its own process on a free loopback port, driven through its control endpoints.

        sim = SimLLMProcess(ttft_ms=30, tokens_per_second=400)   # SimConfig fields; returns once it answers
        env = {"RAGFLEET_LLM_BASE_URL": sim.base_url}
        sim.configure(hang_rate=1.0); sim.stats(); sim.reset(); sim.stop()
    """

    def __init__(self, *, flags: Sequence[str] = (), start_timeout: float = 30.0, **settings: Any) -> None:
        """`settings` become `--name value` flags; `flags` are passed as they are."""
        from services.cli.mesh import free_port  # here: serving the sim needs no gRPC

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"  # what RAGFLEET_LLM_BASE_URL wants
        args = [sys.executable, "-m", "services.cli", "sim-llm", "--port", str(self.port), *flags]
        for name, value in settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                self.stats()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("sim-llm did not start") from None
                time.sleep(0.1)

    def control(self, path: str, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """GET (no payload) or POST one of the /_sim endpoints; returns its JSON."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self.control("/_sim/stats")

    def configure(self, settings: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Change settings live, given as a mapping, as keywords, or both (like dict.update)."""
        self.control("/_sim/config", {**(settings or {}), **more})

    def reset(self) -> None:
        self.control("/_sim/reset", {})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port (printed on the first line)")
    for f in fields(SimConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


def run(args: argparse.Namespace) -> int:
    config = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig)})

    async def _serve() -> None:
        runner, port = await start(config, args.host, args.port)
        print(f"sim-llm listening on http://{args.host}:{port}/v1", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, or the host is not an address here
        print(f"sim-llm: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
