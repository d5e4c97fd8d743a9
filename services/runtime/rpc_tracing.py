"""The RPC spans: a SERVER span around every application RPC, a CLIENT span around every outgoing call.

They replace opentelemetry-instrumentation-grpc's aio interceptors, which cost ~130 us of CPU a call here: a wrapt
proxy of the servicer context, the handler rebuilt and the metadata copied twice on every call, the peer parsed
three times, and one more client interceptor layer for the service token. Here everything fixed per method (span
name, rpc.* attributes) is computed once, the server span is opened by services.runtime.rpc_handlers' own wrapper
(no server interceptor), and the client span, the trace context and the caller's token are added where the call is
made, by ``TracedChannel``'s multicallables: a grpc.aio client interceptor alone cost ~35 us of CPU a call.
The spans carry the names and the attributes that tell something of the instrumentation's (semantic conventions for
gRPC): the method path as the name, rpc.system, rpc.method (fully qualified), rpc.grpc.status_code, and on the
server, for callers from outside the mesh, net.peer.ip and rpc.user_agent. Not the caller's ephemeral port, not
net.peer.name (it only said "localhost" for loopback), and for a method only the mesh's own services may call neither
the peer's address nor its user agent: the guard names the calling service (ragfleet.caller), the caller's span is
this span's parent, and its process's resource names the replica (host.name, services.runtime.telemetry). Each
attribute costs every span a few microseconds to record and to export. Both kinds are recorded as
services.runtime.lean_span's LeanSpans: the SDK's own span cost ~180 Python calls each.

    channel = TracedChannel(grpc.aio.insecure_channel(target), traced=lambda method: True,
                            extra_metadata=lambda: (("authorization", "Bearer ..."),))
    stub = EmbeddingServiceStub(channel)   # generated stubs take it like any channel
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from urllib.parse import unquote

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.runtime.lean_span import LeanTracer

Pairs = Sequence[tuple[str, str]]

_SCOPE = "services.runtime.rpc_tracing"
_TRACER = LeanTracer(_SCOPE)  # every RPC span of the process, server and client
# Server spans: the codes that mean the server failed (semantic conventions); a client's mistake leaves it UNSET.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DATA_LOSS})
_MAX_PEERS = 4096


def _rpc_attributes(method: str) -> dict[str, Any]:
    """rpc.method is the fully qualified method, ``ragfleet.v1.EmbeddingService/Embed``: the RPC conventions merged
    rpc.service into it (open-telemetry/semantic-conventions#3223), one attribute fewer on every span."""
    return {"rpc.system": "grpc", "rpc.method": method.lstrip("/")}


def _peer_attributes(peer: str) -> dict[str, str]:
    """'ipv4:10.2.1.1:57284' -> net.peer.ip (which pod called; its ephemeral port tells nothing)."""
    if not peer or peer.startswith("unix:"):
        return {}
    try:
        ip = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)[0]
    except IndexError:
        return {}
    return {"net.peer.ip": unquote(ip)}


class ServerSpan:
    """The server span of one method: ``begin`` opens it as the current span, child of the caller's traceparent;
    ``finish`` records the final status and closes it. Built once per method (services.runtime.rpc_handlers).
    ``external``: outside callers may call it, so record the caller's address and user agent; off for methods only
    the mesh's own services may call."""

    _peers: dict[str, dict[str, str]] = {}  # connections are long-lived: a peer's attributes are parsed once

    def __init__(self, method: str, *, external: bool = True) -> None:
        self.name = method
        self._attributes = _rpc_attributes(method)
        self._external = external

    def begin(self, context: grpc.aio.ServicerContext) -> tuple[trace.Span, object]:
        carrier = dict(context.invocation_metadata() or ())
        parent = propagate.extract(carrier) if "traceparent" in carrier else None
        attributes = self._attributes
        if self._external:
            attributes = {**attributes, **self._peer(context.peer())}
            agent = carrier.get("user-agent")
            if agent is not None:
                attributes["rpc.user_agent"] = agent
        span = _TRACER.start_span(self.name, parent, SpanKind.SERVER, attributes)
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
    """What every traced call of a channel shares: the span of each call and the metadata it carries."""

    def __init__(self, traced: Callable[[str], bool], extra_metadata: Callable[[], Pairs] | None,
                 client_spans: bool = True) -> None:
        self._traced = traced
        self._extra = extra_metadata
        self._client_spans = client_spans

    def method(self, method: str) -> tuple[str, Mapping[str, Any]] | None:
        """What a method's spans carry, decided once per multicallable (None: not traced)."""
        return (method, {**_rpc_attributes(method), "rpc.grpc.status_code": 0}) if self._traced(method) else None

    def begin(self, known: tuple[str, Mapping[str, Any]] | None,
              metadata: Any) -> tuple[trace.Span | None, Any]:
        """The call's span (None for untraced methods, or without client spans) and its metadata with traceparent
        and token added. Without client spans the traceparent is the caller's current span: the callee's SERVER
        span hangs under it."""
        added: list[tuple[str, str]] = list(self._extra()) if self._extra is not None else []
        span = None
        if known is not None:
            context = None  # the current one
            if self._client_spans:
                span = _TRACER.start_span(known[0], None, SpanKind.CLIENT, known[1])
                context = trace.set_span_in_context(span)
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=context)
            added.extend(carrier.items())
        if not added:
            return span, metadata
        return span, (*metadata, *added) if metadata else tuple(added)

    @staticmethod
    def finish(span: trace.Span, code: grpc.StatusCode, details: str | None) -> None:
        if code is not grpc.StatusCode.OK and span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.CANCELLED:  # the caller gave up (a cache hit, a client gone): no fault
                span.set_status(Status(StatusCode.ERROR, f"{code}:{details}"))
        span.end()


class _TracedMultiCallable:
    """What both kinds of traced multicallable share: the method's span settings, decided once, and starting a
    call with the span begun and the metadata added."""

    __slots__ = ("_callable", "_known", "_spans")

    def __init__(self, multicallable: Any, method: str, spans: _ClientSpans) -> None:
        self._callable = multicallable
        self._known = spans.method(method)
        self._spans = spans

    def _start(self, request: Any, timeout: float | None, metadata: Any, **options: Any) -> tuple[Any, Any]:
        """(the call's span or None, the call)."""
        span, metadata = self._spans.begin(self._known, metadata)
        return span, self._callable(request, timeout=timeout, metadata=metadata, **options)


class _TracedUnaryUnary(_TracedMultiCallable):
    """A unary method: awaiting the call gives the response, as with grpc.aio's own multicallable."""

    __slots__ = ()

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None, credentials: Any = None,
                 wait_for_ready: bool | None = None, compression: Any = None) -> Awaitable[Any]:
        span, call = self._start(request, timeout, metadata, credentials=credentials, wait_for_ready=wait_for_ready,
                                 compression=compression)
        return call if span is None else self._traced(call, span)

    async def _traced(self, call: Awaitable[Any], span: trace.Span) -> Any:
        try:
            response = await call
        except BaseException as exc:
            self._spans.finish(span, _code_of(exc), str(exc))
            raise
        self._spans.finish(span, grpc.StatusCode.OK, None)
        return response


class _TracedStreamCall:
    """A server-streaming call as the caller uses it (``read``, ``async for``, ``cancel``, the rest passed through);
    its span ends with the stream: the last message, an error, or the caller cancelling."""

    __slots__ = ("_call", "_span", "_spans")

    def __init__(self, call: Any, span: trace.Span, spans: _ClientSpans) -> None:
        self._call = call
        self._span: trace.Span | None = span
        self._spans = spans

    def _end(self, code: grpc.StatusCode, details: str | None) -> None:
        span, self._span = self._span, None
        if span is not None:
            self._spans.finish(span, code, details)

    async def read(self) -> Any:
        try:
            message = await self._call.read()
        except BaseException as exc:
            self._end(_code_of(exc), str(exc))
            raise
        if message is grpc.aio.EOF:
            self._end(grpc.StatusCode.OK, None)
        return message

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._relay()

    async def _relay(self) -> AsyncIterator[Any]:
        try:
            async for message in self._call:
                yield message
        except BaseException as exc:
            self._end(_code_of(exc), str(exc))
            raise
        self._end(grpc.StatusCode.OK, None)

    def cancel(self) -> bool:
        self._end(grpc.StatusCode.CANCELLED, None)
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:  # initial_metadata(), code(), details(), done()...
        return getattr(self._call, name)


class _TracedUnaryStream(_TracedMultiCallable):
    """A server-streaming method: the call is read or iterated as grpc.aio's own (see _TracedStreamCall)."""

    __slots__ = ()

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None, credentials: Any = None,
                 wait_for_ready: bool | None = None, compression: Any = None) -> Any:
        span, call = self._start(request, timeout, metadata, credentials=credentials, wait_for_ready=wait_for_ready,
                                 compression=compression)
        return call if span is None else _TracedStreamCall(call, span, self._spans)


class TracedChannel:
    """A grpc.aio channel whose unary and server-streaming calls of a ``traced(method)`` carry the trace context
    (and get a CLIENT span of their own with ``client_spans``), and ``extra_metadata()`` (the service token) on every
    call. Everything else (close, get_state, channel_ready...) is the wrapped channel's."""

    def __init__(self, channel: grpc.aio.Channel, traced: Callable[[str], bool],
                 extra_metadata: Callable[[], Pairs] | None = None, *, client_spans: bool = True) -> None:
        self._channel = channel
        self._spans = _ClientSpans(traced, extra_metadata, client_spans)

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool = False) -> _TracedUnaryUnary:
        return _TracedUnaryUnary(self._channel.unary_unary(method, request_serializer, response_deserializer,
                                                           _registered_method), method, self._spans)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool = False) -> _TracedUnaryStream:
        return _TracedUnaryStream(self._channel.unary_stream(method, request_serializer, response_deserializer,
                                                             _registered_method), method, self._spans)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ragfleet.v1 has no client-streaming RPCs; a traced channel does not carry them")

    stream_stream = stream_unary

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    async def __aenter__(self) -> "TracedChannel":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()


def _code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
