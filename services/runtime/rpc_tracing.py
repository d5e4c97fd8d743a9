"""The RPC spans: a SERVER span around every application RPC, a CLIENT span around every outgoing call.

They replace opentelemetry-instrumentation-grpc's aio interceptors, which cost ~130 us of CPU a call here: a wrapt
proxy of the servicer context, the handler rebuilt and the metadata copied twice on every call, the peer parsed
three times, and one more client interceptor layer for the service token. Here everything fixed per method (span
name, rpc.* attributes) is computed once, the server span is opened by services.runtime.interceptors' own wrapper
(no second server interceptor), and one client interceptor adds both the trace context and the caller's token.
The spans carry the same names and attributes as the instrumentation's (semantic conventions for gRPC): the method
path as the name, rpc.system/service/method, rpc.grpc.status_code, net.peer.* and rpc.user_agent on the server.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Mapping, Sequence
from urllib.parse import unquote

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

Pairs = Sequence[tuple[str, str]]

_SCOPE = "services.runtime.rpc_tracing"
# Server spans: the codes that mean the server failed (semantic conventions); a client's mistake leaves it UNSET.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DATA_LOSS})
_MAX_PEERS = 4096


def _rpc_attributes(method: str) -> dict[str, Any]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _peer_attributes(peer: str) -> dict[str, str]:
    """'ipv4:10.2.1.1:57284' -> net.peer.ip/port (and net.peer.name for loopback), as the instrumentation did."""
    if not peer or peer.startswith("unix:"):
        return {}
    try:
        ip, port = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)
    except (IndexError, ValueError):
        return {}
    ip = unquote(ip)
    found = {"net.peer.ip": ip, "net.peer.port": port}
    if ip in ("[::1]", "127.0.0.1"):
        found["net.peer.name"] = "localhost"
    return found


class ServerSpan:
    """The server span of one method: ``begin`` opens it as the current span, child of the caller's traceparent;
    ``finish`` records the final status and closes it. Built once per method (services.runtime.interceptors)."""

    _peers: dict[str, dict[str, str]] = {}  # connections are long-lived: a peer's attributes are parsed once

    def __init__(self, method: str) -> None:
        self.name = method
        self._attributes = _rpc_attributes(method)
        self._tracer = trace.get_tracer(_SCOPE)

    def begin(self, context: grpc.aio.ServicerContext) -> tuple[trace.Span, object]:
        carrier = dict(context.invocation_metadata() or ())
        parent = propagate.extract(carrier) if "traceparent" in carrier else None
        attributes = {**self._attributes, **self._peer(context.peer())}
        agent = carrier.get("user-agent")
        if agent is not None:
            attributes["rpc.user_agent"] = agent
        span = self._tracer.start_span(self.name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def _peer(self, peer: str) -> dict[str, str]:
        found = self._peers.get(peer)
        if found is None:
            if len(self._peers) >= _MAX_PEERS:
                self._peers.clear()
            found = self._peers[peer] = _peer_attributes(peer)
        return found

    def finish(self, span: trace.Span, token: object, code: grpc.StatusCode, details: str | None,
               error: BaseException | None = None) -> None:
        """``error``: an unexpected exception (it becomes INTERNAL), recorded on the span with its traceback."""
        try:
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, f"{code}:{details}"))
                if error is not None:
                    span.record_exception(error)
            span.end()
        finally:
            otel_context.detach(token)


class _ClientSpans:
    """What both client interceptors share: the span of each call and the metadata it carries."""

    def __init__(self, traced: Callable[[bytes | str], bool], extra_metadata: Callable[[], Pairs] | None) -> None:
        self._traced = traced
        self._extra = extra_metadata
        self._methods: dict[bytes | str, tuple[str, Mapping[str, Any]] | None] = {}
        self._tracer: trace.Tracer | None = None

    def _method(self, method: bytes | str) -> tuple[str, Mapping[str, Any]] | None:
        if method not in self._methods:
            name = method.decode() if isinstance(method, bytes) else method  # grpc.aio passes bytes (grpc#31092)
            self._methods[method] = (name, {**_rpc_attributes(name), "rpc.grpc.status_code": 0}) \
                if self._traced(name) else None
        return self._methods[method]

    def begin(self, details: grpc.aio.ClientCallDetails) -> tuple[trace.Span | None, grpc.aio.ClientCallDetails]:
        """The call's span (None for infrastructure methods) and its details with traceparent and token added."""
        added: list[tuple[str, str]] = list(self._extra()) if self._extra is not None else []
        known = self._method(details.method)
        span = None
        if known is not None:
            if self._tracer is None:
                self._tracer = trace.get_tracer(_SCOPE)  # on first call: after setup_tracing installed the provider
            span = self._tracer.start_span(known[0], kind=SpanKind.CLIENT, attributes=known[1])
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            added.extend(carrier.items())
        if not added:
            return span, details
        metadata = grpc.aio.Metadata(*details.metadata, *added) if details.metadata else grpc.aio.Metadata(*added)
        return span, details._replace(metadata=metadata)  # type: ignore[attr-defined]

    @staticmethod
    def finish(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
        if code is not grpc.StatusCode.OK and span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.CANCELLED:  # the caller gave up (a cache hit, a client gone): no fault
                span.set_status(Status(StatusCode.ERROR, f"{code}:{details}"))
        span.end()


class _UnaryClient(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, spans: _ClientSpans) -> None:
        self._spans = spans

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        span, details = self._spans.begin(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
            code = await call.code()
        except BaseException as exc:
            self._spans.finish(span, _code_of(exc), str(exc))
            raise
        self._spans.finish(span, code, await call.details() if code is not grpc.StatusCode.OK else None)
        return call


class _StreamClient(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, spans: _ClientSpans) -> None:
        self._spans = spans

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        span, details = self._spans.begin(details)
        if span is None:
            return await continuation(details, request)
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            self._spans.finish(span, _code_of(exc), str(exc))
            raise
        return self._relay(span, call)

    async def _relay(self, span: trace.Span, call: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The responses; the span ends with the stream (its last message or its error)."""
        code, details = grpc.StatusCode.OK, None
        try:
            async for response in call:
                yield response
        except BaseException as exc:
            code, details = _code_of(exc), str(exc)
            raise
        finally:
            self._spans.finish(span, code, details)


def _code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def client_interceptors(traced: Callable[[bytes | str], bool],
                        extra_metadata: Callable[[], Pairs] | None = None) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call kind (grpc.aio files an interceptor under its first matching kind only): each call
    gets a CLIENT span when ``traced(method)``, its traceparent, and ``extra_metadata()`` (the service token)."""
    spans = _ClientSpans(traced, extra_metadata)
    return [_UnaryClient(spans), _StreamClient(spans)]
