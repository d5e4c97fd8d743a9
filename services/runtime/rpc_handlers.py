"""The wrapper around every application RPC: it traces it, maps domain errors to statuses and records its metrics.

Each method's handler is wrapped once, when the service is registered (``RpcHandlers.register`` runs the generated
``add_*_to_server`` against a stand-in for the server), not by a grpc.aio server interceptor: an interceptor is
awaited on every call, health checks included, and cost ~25 us of CPU a call on this machine for nothing but the
handler lookup. The wrapper opens the RPC's server span (services.runtime.rpc_tracing), so the guard's and the
handler's aborts land on it, and closes it with the final status. Anything unexpected is logged with
its traceback and becomes INTERNAL; the process never dies of a handler bug. Every application method receives its
request as raw bytes and passes it through the guard (services.runtime.guard: authentication, size limit, parsing)
before the handler runs, so hostile input is refused the same way on every service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from services.runtime.errors import RagfleetError, from_rpc_error
from services.runtime.guard import GuardPolicy, MethodGuard, Rejected, record_rejection
from services.runtime.rpc_tracing import ServerSpan
from services.runtime.telemetry import INFRA_METHOD_PREFIXES

log = logging.getLogger("ragfleet.rpc")

RPC_REQUESTS = Counter("ragfleet_rpc_requests_total", "RPCs handled", ["method", "code"])
RPC_LATENCY = Histogram("ragfleet_rpc_duration_seconds", "RPC handling time", ["method"],
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RPC_IN_FLIGHT = Gauge("ragfleet_rpc_in_flight", "RPCs being handled", ["method"],
                      multiprocess_mode="livesum")  # several workers (runtime/workers.py): the process's total


class InFlight:
    """Counts application RPCs in progress, so shutdown can wait for them to drain."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


async def _abort_for(error: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(error, RagfleetError):
        await context.abort(error.code, error.message)
    if isinstance(error, grpc.aio.AioRpcError):
        # A downstream call failed and the handler let it escape: keep its code, say who failed.
        mapped = from_rpc_error("a downstream", error)
        await context.abort(mapped.code, mapped.message)
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}")


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is not None and isinstance(error, RagfleetError):
        return error.code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def _unexpected(error: BaseException) -> BaseException | None:
    """The error worth a stack trace on the span: not a domain error, nor a downstream status passed on."""
    return None if isinstance(error, (RagfleetError, grpc.aio.AioRpcError)) else error


class _MethodMetrics:
    """One method's metric children, looked up once: ``labels()`` per RPC was ~2 % of a busy service's CPU."""

    __slots__ = ("in_flight", "latency", "_method", "_requests")

    def __init__(self, method: str) -> None:
        self._method = method
        self.in_flight = RPC_IN_FLIGHT.labels(method)
        self.latency = RPC_LATENCY.labels(method)
        self._requests: dict[grpc.StatusCode, Any] = {}

    def requests(self, code: grpc.StatusCode) -> Any:
        child = self._requests.get(code)
        if child is None:
            child = self._requests[code] = RPC_REQUESTS.labels(self._method, code.name)
        return child


class _Registrar:
    """Stands in for the server in a generated ``add_*_to_server``: it gets the method handlers of one proto service
    and registers their wrapped versions with the real server (generic lookup and gRPC's registered methods)."""

    def __init__(self, handlers: "RpcHandlers", server: grpc.aio.Server) -> None:
        self._handlers = handlers
        self._server = server
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        """Ignored: the generated code passes the same handlers to add_registered_method_handlers next."""

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers.add(self._server, service, method_handlers)
        self.registered.append(service)


class RpcHandlers:
    """Wraps the application methods of one server; health and reflection are registered as they are."""

    def __init__(self, in_flight: InFlight, policy: GuardPolicy | None = None) -> None:
        self._in_flight = in_flight
        self._policy = policy or GuardPolicy()

    def register(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
        """``add_to_server(servicer, server)`` (a generated function), with every method handler wrapped."""
        registrar = _Registrar(self, server)
        add_to_server(servicer, registrar)
        if not registrar.registered:  # stubs generated by a grpcio-tools older than 1.63: nothing was registered
            raise RuntimeError(f"{getattr(add_to_server, '__name__', add_to_server)} registered no methods; "
                               "regenerate the stubs with scripts/gen_protos.py")

    def add(self, server: grpc.aio.Server, service: str, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Register one proto service's handlers (by method name), wrapped."""
        wrapped = {name: self.wrap(handler, f"/{service}/{name}") for name, handler in method_handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        server.add_registered_method_handlers(service, wrapped)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler of `method` behind the guard, its span and its metrics (infrastructure methods as they are)."""
        if method.startswith(INFRA_METHOD_PREFIXES):
            return handler
        metrics = _MethodMetrics(method)
        # The request arrives as bytes (no deserializer): the guard authenticates, bounds and parses it.
        guard = self._policy.guard(method, handler.request_deserializer)
        mesh_only = guard.authenticator is not None and guard.authenticator.mesh_callers
        span = ServerSpan(method, external=not mesh_only)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, guard, metrics, span),
                request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, guard, metrics, span),
                request_deserializer=None, response_serializer=handler.response_serializer)
        return handler

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], guard: MethodGuard, metrics: _MethodMetrics,
                    server_span: ServerSpan) -> Callable[..., Awaitable[Any]]:
        rpc = _Rpc(guard, metrics, server_span, self._in_flight)

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            started = rpc.begin(context)
            error: BaseException | None = None
            try:
                return await behavior(guard.admit(raw, context.invocation_metadata()), context)
            except BaseException as exc:  # noqa: BLE001 - mapped by fail(), re-raised as an abort
                error = exc
                await rpc.fail(exc, context)
                raise
            finally:
                rpc.end(context, started, error)

        return unary

    def _wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]], guard: MethodGuard, metrics: _MethodMetrics,
                     server_span: ServerSpan) -> Callable[..., AsyncIterator[Any]]:
        rpc = _Rpc(guard, metrics, server_span, self._in_flight)

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = rpc.begin(context)
            error: BaseException | None = None
            try:
                async for item in behavior(guard.admit(raw, context.invocation_metadata()), context):
                    yield item
            except BaseException as exc:  # noqa: BLE001
                error = exc
                await rpc.fail(exc, context)
                raise
            finally:
                rpc.end(context, started, error)

        return stream


# Exceptions that end an RPC without an error of ours to map: the caller went away, or the handler already aborted.
_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)


class _Rpc:
    """What the unary and the streaming wrapper of one method do around each call: open the span and count the
    call in flight (``begin``), map a failure to its status (``fail``), then record the metrics and close the span
    with the final status (``end``)."""

    __slots__ = ("guard", "_metrics", "_span", "_in_flight")

    def __init__(self, guard: MethodGuard, metrics: _MethodMetrics, span: ServerSpan, in_flight: InFlight) -> None:
        self.guard = guard
        self._metrics = metrics
        self._span = span
        self._in_flight = in_flight

    def begin(self, context: grpc.aio.ServicerContext) -> tuple[float, trace.Span, object]:
        started = time.perf_counter()
        span, token = self._span.begin(context)
        self._in_flight.enter()
        self._metrics.in_flight.inc()
        return started, span, token

    async def fail(self, error: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Abort with the status `error` maps to (a guard's refusal is counted and logged on one line first)."""
        if isinstance(error, _PASS_THROUGH):
            return
        if isinstance(error, Rejected):
            record_rejection(self.guard, error, context.peer())
        await _abort_for(error, context, self.guard.method)

    def end(self, context: grpc.aio.ServicerContext, started: tuple[float, trace.Span, object],
            error: BaseException | None) -> None:
        start, span, token = started
        self._metrics.in_flight.dec()
        self._in_flight.exit()
        self._metrics.latency.observe(time.perf_counter() - start)
        code = _code_of(context, error)
        self._metrics.requests(code).inc()
        self._span.finish(span, token, code, None if code is grpc.StatusCode.OK else context.details(),
                          None if error is None else _unexpected(error))
