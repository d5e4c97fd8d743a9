"""The OpenAI-compatible streaming backend: one pooled AsyncOpenAI client per process.

Retry rule: an attempt may be retried (``services.runtime.retry``) only while no content token has been received;
once a token is forwarded the stream is never replayed, because the caller already holds part of the answer.
Each attempt must deliver its first token within ``timeouts.first_token`` and within the caller's deadline, less
the fallback's reserve when a fallback is on (a hung LLM then still leaves time for the offline answer);
after that, ``timeouts.read`` bounds the silence between chunks. Closing the stream in ``finally`` closes the HTTP
response, so a cancelled gRPC call cancels the upstream request (the LLM sees the disconnect and stops generating).

The SDK sends the request (auth, base URL, timeouts, pool, status errors -> APIStatusError) but the streamed body is
read raw and decoded by ``sse`` into plain dicts: the SDK's per-chunk pydantic model cost ~0.3 ms of CPU per chunk, and
at 100 streams x 20 tokens/s the event loop saturated (bench/generation_stream.py). Read errors are mapped to the
SDK's exceptions, so retry rules and messages stay the same. With the SDK's aiohttp transport (the one
services.runtime.openai_client builds) the body is read straight from aiohttp's stream, under the five async
generators httpx2 and the transport stack per read (its exceptions mapped by the transport's own table): the same
bytes, without ~5 layers of generator switching per chunk.

    answerer = OpenAIAnswerer(config.llm, counter)
    async for event in answerer.stream(prompt): ...
    await answerer.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import ssl
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

import anyio
import httpx2
import openai
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.generation import metrics
from services.generation.base import FINISH_LENGTH, FINISH_STOP, Delta, Done, Event, LLMStreamError, LLMUnavailable
from services.generation.config import LLMConfig
from services.generation.prompt import Prompt, TokenCounter
from services.generation.sse import ErrorEvent, SSEDecoder, decode_data, is_done
from services.runtime.errors import DeadlineExceeded
from services.runtime.lru import LruCache
from services.runtime.openai_client import openai_client
from services.runtime.retry import RetryPolicy, is_transient
from services.runtime import telemetry
from services.runtime.telemetry import tracer

try:  # the SDK's aiohttp transport, whose body _chunks reads directly (see _aiohttp_body)
    from openai._vendor.httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
except ImportError:  # pragma: no cover - another SDK layout: every body is read through httpx2
    AiohttpResponseStream = None  # type: ignore[assignment,misc]
    map_aiohttp_exceptions = None  # type: ignore[assignment]

log = logging.getLogger("ragfleet.generation.llm")
_tracer = tracer(__name__)

_SUMMARY_CACHE_SIZE = 512
_FINISH = {"length": FINISH_LENGTH}
_CHAT_PATH = "/chat/completions"
_DEADLINE_SLACK = 0.005  # seconds: a first-token wait ending this close to the deadline was cut by it
_DRAIN_TIMEOUT = 0.1  # after [DONE]: read the body's end so the HTTP/1.1 connection goes back to the pool
_SUMMARY_INSTRUCTION = ("Summarise this earlier part of a conversation in a few sentences. Keep names, numbers and "
                        "anything the user asked to remember.")


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no first token in time"
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {error.message}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _sdk_error(exc: Exception, request: httpx2.Request) -> Exception:
    """The SDK's exception for a failure while reading the body (as its own stream reader raises them)."""
    if isinstance(exc, httpx2.TimeoutException):
        return openai.APITimeoutError(request=request)
    if isinstance(exc, (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream)):
        return openai.APIConnectionError(request=request)
    if isinstance(exc, ErrorEvent):
        return openai.APIError(exc.message, request, body=exc.body)
    return exc


def _chunks(response: httpx2.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The stream's chunks as plain dicts, until ``data: [DONE]`` or the end of the body."""
    content = _aiohttp_body(response)
    return _httpx_chunks(response) if content is None else _aiohttp_chunks(response, content)


def _aiohttp_body(response: httpx2.Response) -> Any:
    """The aiohttp StreamReader under a response of the SDK's aiohttp transport with an identity-encoded body (what
    ``response.aiter_bytes()`` would yield, byte for byte), else None."""
    if AiohttpResponseStream is None or response.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    stream = response.stream
    inner = getattr(stream, "_stream", stream)  # httpx2's BoundAsyncStream (elapsed time) around the transport's
    if type(inner) is not AiohttpResponseStream or response.is_stream_consumed or response.is_closed:
        return None
    response.is_stream_consumed = True  # as aiter_raw marks it: nothing else may read the body now
    return inner._aiohttp_response.content


async def _aiohttp_chunks(response: httpx2.Response, content: Any) -> AsyncGenerator[dict[str, Any], None]:
    read = content.readany  # b"" only at the end of the body
    decoder = SSEDecoder()
    try:
        while raw := await read():
            chunks, done = _decode(decoder, raw)
            for chunk in chunks:
                yield chunk
            if done:
                if response.http_version == "HTTP/1.1":
                    await _drain(read)
                return
    except Exception as exc:  # noqa: BLE001 - re-raised as the transport, then the SDK, would raise it
        transport = _transport_error(exc)  # exc, or the httpx2 error the transport raises for it (from exc)
        mapped = _sdk_error(transport, response.request)
        if mapped is exc:
            raise
        if mapped is transport:
            raise transport
        raise mapped from transport


def _transport_error(exc: Exception) -> Exception:
    """``exc`` as the aiohttp transport's stream raises it (an httpx2 exception for aiohttp's own)."""
    try:
        with map_aiohttp_exceptions():
            raise exc
    except Exception as mapped:  # noqa: BLE001 - the mapping's result, or exc itself
        return mapped
    raise AssertionError("unreachable")  # pragma: no cover


def _decode(decoder: SSEDecoder, raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    """One read of the body: the chunks it completes, and whether [DONE] came (anything after it is ignored)."""
    chunks = []
    for event, data in decoder.feed(raw):
        if is_done(data):
            return chunks, True
        chunk = decode_data(event, data)
        if chunk is not None:
            chunks.append(chunk)
    return chunks, False


async def _httpx_chunks(response: httpx2.Response) -> AsyncGenerator[dict[str, Any], None]:
    body = response.aiter_bytes()
    decoder = SSEDecoder()
    try:
        try:
            async for raw in body:
                chunks, done = _decode(decoder, raw)
                for chunk in chunks:
                    yield chunk
                if done:
                    if response.http_version == "HTTP/1.1":
                        await _drain(body.__anext__)
                    return
        except Exception as exc:  # noqa: BLE001 - re-raised as the SDK would raise it
            mapped = _sdk_error(exc, response.request)
            if mapped is exc:
                raise
            raise mapped from exc
    finally:
        await body.aclose()


async def _drain(read: Callable[[], Awaitable[bytes]]) -> None:
    """Read the rest of a body after [DONE] so its HTTP/1.1 connection can be reused, within _DRAIN_TIMEOUT. `read`
    ends with b"" (aiohttp's readany) or StopAsyncIteration (an iterator's __anext__, an Exception like any other
    here)."""
    try:
        async with asyncio.timeout(_DRAIN_TIMEOUT):
            while await read():
                pass
    except Exception:  # noqa: BLE001 - the answer is complete; at worst the connection is not reused
        pass


class OpenAIAnswerer:
    name = "openai"

    def __init__(self, config: LLMConfig, counter: TokenCounter) -> None:
        self._config = config
        self._counter = counter
        t = config.timeouts
        # Retries are ours: only before the first token.
        self._client = openai_client(
            base_url=config.base_url, api_key=config.api_key, max_connections=config.max_connections,
            # `pool` bounds the wait for a pooled connection plus the connect (aiohttp's `connect`): a stream that
            # waits for a free connection is waiting for its first token, so it gets that budget, not `connect`.
            timeout=openai.Timeout(t.read, connect=t.connect, read=t.read, write=t.read, pool=t.first_token))
        # The SDK imports a resource's modules on first access (~20 ms for chat): pay that at start, not in the
        # first Ask's time to first token.
        self._client.chat.completions  # noqa: B018
        self._summaries = LruCache[str](max_entries=_SUMMARY_CACHE_SIZE, ttl=math.inf)  # keyed by content
        # A wait longer than an attempt's whole first-token budget is not worth it: the fallback answers sooner.
        self._retry = RetryPolicy(max_retries=config.max_retries, base_delay=config.retry_backoff,
                                  max_server_wait=t.first_token)

    @property
    def target(self) -> str:
        return self._config.base_url

    def _request(self, prompt: Prompt) -> dict[str, Any]:
        s = prompt.sampling
        body: dict[str, Any] = {"model": s.model, "messages": prompt.messages, "temperature": s.temperature,
                                "max_tokens": s.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}}
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.stop:
            body["stop"] = list(s.stop)
        return body

    def _first_token_timeout(self, prompt: Prompt) -> float:
        timeout = self._config.timeouts.first_token
        if prompt.llm_deadline is not None:
            timeout = min(timeout, prompt.llm_deadline - asyncio.get_running_loop().time())
        return max(timeout, 0.0)

    def _span(self, prompt: Prompt) -> tuple[Any, bool]:
        """(the span the LLM call's figures go on, whether this call owns it). With client spans on
        (RAGFLEET_TRACE_CLIENT_SPANS) a CLIENT span ``chat <model>`` of its own, as the GenAI semantic conventions
        draw it; off (the default, as for the calls between the services), the Generate server span: it times
        little besides this call, and a span of its own was a fifth of the spans of an Ask and nine of its
        attributes (bench/tracing_cost.py)."""
        model = prompt.sampling.model
        if telemetry.client_spans():
            return _tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": prompt.sampling.max_tokens,
                "gen_ai.request.temperature": prompt.sampling.temperature,
                "server.address": self._config.base_url}), True
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("gen_ai.request.model", model)
        return span, False

    async def stream(self, prompt: Prompt) -> AsyncIterator[Event]:
        model = prompt.sampling.model
        span, owned = self._span(prompt)
        response: httpx2.Response | None = None
        chunks: AsyncGenerator[dict[str, Any], None] | None = None
        try:
            response, chunks, chunk = await self._open(prompt, span)
            finish, usage, parts = FINISH_STOP, None, []
            try:
                while chunk is not None:
                    found = chunk.get("usage")
                    if found:
                        usage = found
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta")
                        text = delta.get("content") if delta else None
                        if text and type(text) is str:
                            parts.append(text)
                            yield Delta(text)
                        reason = choice.get("finish_reason")
                        if reason:
                            finish = _FINISH.get(reason, FINISH_STOP)
                    chunk = await anext(chunks, None)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - any transport/protocol failure after tokens were sent
                metrics.LLM_STREAM_ERRORS.inc()
                raise LLMStreamError(f"LLM at {self._config.base_url} (model {model}) failed mid-stream: "
                                     f"{describe(exc)}") from exc
            prompt_tokens = _count(usage, "prompt_tokens")
            if prompt_tokens is None:
                prompt_tokens = prompt.prompt_tokens
            completion = _count(usage, "completion_tokens")
            if completion is None:
                completion = self._counter.count("".join(parts), prompt.encoding)
            if span.is_recording():
                span.set_attributes({"gen_ai.usage.input_tokens": prompt_tokens,
                                     "gen_ai.usage.output_tokens": completion,
                                     "gen_ai.response.finish_reasons": [finish]})
            yield Done(finish, prompt_tokens, completion, model)
        except BaseException as exc:
            if owned:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            elif not isinstance(exc, (asyncio.CancelledError, GeneratorExit)) and span.is_recording():
                # Not the server span's status: a fallback may still answer. gRPC's own code ends up on it.
                span.add_event("chat failed", {"error.type": type(exc).__name__, "error": describe(exc)})
            raise
        finally:
            # Closes the HTTP response: on cancellation this is what stops the upstream generation.
            await _close(chunks, response)
            if owned:
                span.end()

    async def _open(self, prompt: Prompt, span: Any) -> tuple[httpx2.Response, AsyncGenerator[dict[str, Any], None],
                                                             dict[str, Any] | None]:
        """Start the stream and read up to its first chunk with content (or finish/usage), retrying within bounds.

        Returns the response, its chunk iterator and that first chunk (None when the stream ended before one); the
        chunks before it carry nothing the caller reads (e.g. a role-only delta).
        """
        body = self._request(prompt)
        attempt = 0
        while True:
            attempt += 1
            response: httpx2.Response | None = None
            chunks: AsyncGenerator[dict[str, Any], None] | None = None
            try:
                async with asyncio.timeout(self._first_token_timeout(prompt)):
                    # The client's generic post, not chat.completions.create: the body is already plain JSON types,
                    # and create's per-call transform of it (TypedDict walk over every message) was ~8 % of
                    # generation's CPU per Ask. Same request, auth, timeouts and status errors.
                    response = await self._client.post(_CHAT_PATH, cast_to=httpx2.Response, body=body, stream=True)
                    chunks = _chunks(response)
                    first = None
                    async for chunk in chunks:
                        if _carries_something(chunk):
                            first = chunk
                            break
                metrics.LLM_ATTEMPTS.labels("ok").inc()
                return response, chunks, first
            except (asyncio.CancelledError, GeneratorExit):
                await _close(chunks, response)
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                await _close(chunks, response)
                metrics.LLM_ATTEMPTS.labels("timeout" if isinstance(exc, TimeoutError)
                                            else "retryable" if is_transient(exc) else "error").inc()
                span.add_event("attempt failed", {"attempt": attempt, "error": describe(exc)})
                if (isinstance(exc, TimeoutError) and prompt.deadline is not None and not prompt.fallback_reserve
                        and asyncio.get_running_loop().time() >= prompt.deadline - _DEADLINE_SLACK):
                    # The caller's deadline, not the LLM, ended the wait: say so (no fallback can beat it either).
                    # With a fallback reserve the wait ended early on purpose: LLMUnavailable below lets it answer.
                    raise DeadlineExceeded(f"deadline passed before the LLM at {self._config.base_url} sent a first "
                                           f"token (attempt {attempt})") from exc
                delay = self._retry.delay(exc, attempt, deadline=prompt.llm_deadline)
                if delay is None:
                    raise LLMUnavailable(f"LLM at {self._config.base_url} (model {prompt.sampling.model}) "
                                         f"failed: {describe(exc)} after {attempt} attempt(s)") from exc
                log.warning("LLM attempt %d failed (%s); retrying in %.3fs", attempt, describe(exc), delay)
                await asyncio.sleep(delay)

    async def summarise(self, turns: Sequence[dict[str, str]], max_tokens: int) -> str | None:
        """Summarise old turns with the summary model; None (-> the turns are dropped) when it fails."""
        model = self._config.summary_model
        if model is None:
            return None
        transcript = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
        key = hashlib.sha256(f"{model}\0{max_tokens}\0{transcript}".encode()).hexdigest()
        cached = self._summaries.get(key)
        if cached is not None:
            return cached
        try:
            reply = await asyncio.wait_for(self._client.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0.0,
                messages=[{"role": "system", "content": _SUMMARY_INSTRUCTION},
                          {"role": "user", "content": transcript}]), self._config.timeouts.first_token)
        except Exception as exc:  # noqa: BLE001 - a summary is an optimisation; dropping the turns is the fallback
            log.warning("history summary failed (%s); dropping old turns instead", describe(exc))
            return None
        text = (reply.choices[0].message.content or "").strip() if reply.choices else ""
        if text:
            self._summaries.put(key, text)
        return text or None

    async def close(self) -> None:
        await self._client.close()


def _carries_something(chunk: dict[str, Any]) -> bool:
    return chunk.get("usage") is not None or any(
        c.get("finish_reason") or (c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


def _count(usage: dict[str, Any] | None, key: str) -> int | None:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) else None


async def _close(chunks: AsyncGenerator[dict[str, Any], None] | None, response: httpx2.Response | None) -> None:
    try:
        if chunks is not None:
            await chunks.aclose()
    finally:
        if response is not None:
            await response.aclose()
