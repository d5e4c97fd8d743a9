"""gRPC server bootstrap shared by all services: the start-up contract, health, reflection, RPC wrappers, metrics,
graceful shutdown.

Every service's server.py declares ``SERVICE = Service(<proto service descriptor>, <config class>)`` and
``async def build(config) -> Started``; its ``__main__`` and ``ragfleet serve <name>`` run ``main(SERVICE, build)``,
and tests and benchmarks call the same ``build(config)``. In a test:

    server = GrpcServer(config, bindings=[Binding(SERVICE_NAME, add_servicer_fn, servicer)], on_stop=close_clients)
    port = await server.start()        # binds; returns the real port (config.port may be 0)
    await server.wait()                # until SIGTERM/SIGINT, then drains and stops

Shutdown order (Kubernetes-friendly): health flips to NOT_SERVING while the server keeps answering (a short notice
for health watchers and readiness probes), then GOAWAY: no new calls, in-flight RPCs and streams drain for the rest
of ``grace_seconds``; then ``on_stop`` closes clients and spans flush.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Mapping, Protocol, Self, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from grpc_reflection.v1alpha import reflection

from services.runtime import telemetry
from services.runtime import internal_auth
from services.runtime.config import ServerConfig
from services.runtime.errors import ConfigError
from services.runtime.guard import Authenticator, GuardPolicy
from services.runtime.rpc_handlers import InFlight, RpcHandlers
from services.runtime.logs import setup_logging
from services.runtime.workers import WorkerLink, arm_parent_death_signal, supervise

log = logging.getLogger("ragfleet.serve")

CONFIG_ERROR = 2  # exit status: a RAGFLEET_* variable (or a file it names) is wrong; the message names it
STARTUP_FAILED = 3  # exit status: the configuration parsed, but building the service or binding its port failed


@dataclass(frozen=True)
class Binding:
    """One proto service to register: its full name, the generated add_*_to_server function, the servicer.

    ``max_request_bytes`` maps a method name ("Ask") to its largest legitimate request, sized from the service's own
    validation limits (others get the server's MAX_MESSAGE_MB). ``authenticator`` decides who may call this service;
    None means the server's (the internal service token, when that is on)."""

    service_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    max_request_bytes: Mapping[str, int] = field(default_factory=dict)
    authenticator: Authenticator | None = None

    def method_paths(self) -> list[str]:
        service = descriptor_pool.Default().FindServiceByName(self.service_name)
        return [f"/{self.service_name}/{m.name}" for m in service.methods]


@dataclass(frozen=True)
class Started:
    """What a service's ``build(config)`` returns: the proto services to register, and what closes their clients
    once the server has drained (None: nothing to close)."""

    bindings: Sequence[Binding]
    on_stop: Callable[[], Awaitable[None]] | None = None


class ServiceConfig(Protocol):
    """A service's config class (EmbeddingConfig, ...): parsed once from RAGFLEET_* variables, ConfigError if bad."""

    @property
    def server(self) -> ServerConfig: ...

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self: ...


ConfigT = TypeVar("ConfigT", bound=ServiceConfig)
Build = Callable[[ConfigT], Awaitable[Started]]


@dataclass(frozen=True)
class Service(Generic[ConfigT]):
    """What the entry point knows of a service before building it: its proto service and its config class.

        SERVICE = Service(embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"], EmbeddingConfig)
        SERVICE.full_name, SERVICE.name    # "ragfleet.v1.EmbeddingService", "embedding"
    """

    proto: ServiceDescriptor
    config: type[ConfigT]

    @property
    def full_name(self) -> str:
        """What health, reflection and the guard know the service by."""
        return str(self.proto.full_name)

    @property
    def name(self) -> str:
        """The component: its RAGFLEET_<NAME>_ variables, its logs' "service" and ``ragfleet serve <name>``."""
        return str(self.proto.name).removesuffix("Service").lower()


def guard_policy(config: ServerConfig, bindings: Sequence[Binding],
                 authenticator: Authenticator | None = None) -> GuardPolicy:
    """Per-method request limits and authenticators of a server (services.runtime.guard)."""
    limits = {f"/{b.service_name}/{name}": size for b in bindings for name, size in b.max_request_bytes.items()}
    authenticators = {b.service_name: b.authenticator or authenticator for b in bindings
                      if (b.authenticator or authenticator) is not None}
    return GuardPolicy(config.max_message_mb * 1024 * 1024, limits, authenticators)


def server_options(config: ServerConfig, receive_limit: int | None = None) -> list[tuple[str, Any]]:
    """``receive_limit``: the largest request any method accepts (gRPC core refuses bigger ones unread)."""
    max_bytes = config.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", min(max_bytes, receive_limit or max_bytes)),
        # Recycle connections so clients re-resolve DNS and spread over new replicas.
        ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_seconds * 1000)),
        ("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Off unless this is one of several workers (services.runtime.workers): on by default in gRPC on Linux, it
        # would let a second server on the same port silently take half of the connections.
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
    ]


class GrpcServer:
    def __init__(self, config: ServerConfig, *, bindings: Sequence[Binding],
                 on_stop: Callable[[], Awaitable[None]] | None = None,
                 authenticator: Authenticator | None = None) -> None:
        """``authenticator`` guards every binding that brings none of its own (the internal service token)."""
        self.config = config
        self.bindings = list(bindings)
        policy = guard_policy(config, self.bindings, authenticator)
        self.receive_limit = policy.receive_limit(p for b in self.bindings for p in b.method_paths())
        self.health = HealthServicer()
        self.in_flight = InFlight()
        self._on_stop = on_stop
        self._stopping: asyncio.Event | None = None
        self._stopped = False
        self.port = 0
        # No server interceptor: each application method's handler is wrapped once, here (guard, span, metrics).
        self.server = grpc.aio.server(options=server_options(config, self.receive_limit))
        handlers = RpcHandlers(self.in_flight, policy)
        for binding in self.bindings:
            handlers.register(binding.add_to_server, binding.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [b.service_name for b in self.bindings]
        reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME], self.server)

    async def start(self) -> int:
        try:
            self.port = self.server.add_insecure_port(self.config.address)
        except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}: is the port in use?")
        if self.config.metrics_port:
            from prometheus_client import start_http_server

            try:
                start_http_server(self.config.metrics_port, addr=self.config.host)
            except OSError as exc:
                log.warning("metrics port %s unavailable (%s); metrics disabled", self.config.metrics_port, exc)
        await self.server.start()
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"address": f"{self.config.host}:{self.port}",
                                              "services": [b.service_name for b in self.bindings],
                                              "metrics_port": self.config.metrics_port, "pid": os.getpid()}})
        return self.port

    async def _set_all(self, status: int) -> None:
        await self.health.set("", status)
        for binding in self.bindings:
            await self.health.set(binding.service_name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop, in two phases within ``grace`` seconds.

        1. Notice (up to ``drain_notice_seconds``, or until idle): health reports NOT_SERVING while the server keeps
           answering, so callers that watch health (the mesh's channels) and readiness probes move new calls away
           without a single one failing.
        2. GOAWAY: the server stops taking new calls, so clients still holding a connection (an L4 Service keeps
           them open) reconnect to another replica; calls in flight keep running until the grace period ends.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        started = time.monotonic()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", extra={"fields": {"in_flight": self.in_flight.count, "grace_seconds": grace}})
        await self.in_flight.wait_idle(min(grace, self.config.drain_notice_seconds))
        remaining = max(0.0, grace - (time.monotonic() - started))
        await self.health.enter_graceful_shutdown()
        await self.server.stop(remaining)
        drained = self.in_flight.count == 0
        if self._on_stop is not None:
            try:
                await self._on_stop()
            except Exception:  # noqa: BLE001 - shutdown must finish
                log.exception("error while closing clients")
        log.info("stopped", extra={"fields": {"drained": drained,
                                              "seconds": round(time.monotonic() - started, 3)}})
        telemetry.shutdown_tracing()

    async def wait(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        server_done = asyncio.create_task(self.server.wait_for_termination())
        stop_requested = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({server_done, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        stop_requested.cancel()
        await self.stop()
        server_done.cancel()


def bootstrap(config: ServerConfig) -> None:
    """Logging and tracing for a service process; call first in every service's main()."""
    setup_logging(config.component, level=config.log_level, fmt=config.log_format)
    telemetry.setup_tracing(config.component, client_spans=config.trace_client_spans)


async def run_server(config: ServerConfig, start: Callable[[], Awaitable[Started]],
                     auth: internal_auth.InternalAuth | None = None, worker: WorkerLink | None = None) -> None:
    """Build the service's servicers (async, e.g. to load a model), serve, and stop on a signal. ``auth`` guards the
    internal port (its token is what this process's channels present: see ``serve``); a ``worker`` tells its
    supervisor once it serves."""
    started = await start()
    server = GrpcServer(config, bindings=started.bindings, on_stop=started.on_stop,
                        authenticator=auth.authenticator if auth is not None else None)
    await server.start()
    if worker is not None:
        worker.ready()
    await server.wait()


def main(service: Service[ConfigT], build: Build[ConfigT], *, worker: WorkerLink | None = None) -> int:
    """A service process (``python -m services.<name>``, ``ragfleet serve <name>``): parse the config, bootstrap
    logging and tracing, build and serve until SIGTERM or SIGINT; returns the exit status.

    A failure before serving logs one structured line with the details, then ends the process with one line on
    stderr: ``<name>: configuration error: <message naming the variable>`` (exit 2: a ConfigError, from parsing or
    from build, e.g. a tokenizer file that does not load) or ``<name>: start-up failed: <reason>`` (exit 3).

    With RAGFLEET_<SERVICE>_WORKERS > 1 this process supervises that many workers on the same port
    (services.runtime.workers), each of which runs this function with ``worker`` and reports to it."""
    arm_parent_death_signal()  # started by `ragfleet up`, LocalMesh or a supervisor: end with it
    try:
        config = service.config.from_env()
    except ConfigError as exc:
        setup_logging(service.name)
        return _failed(service.name, exc, worker)
    if worker is None and config.server.workers > 1:
        setup_logging(config.server.component, level=config.server.log_level, fmt=config.server.log_format)
        try:
            return supervise(service.name, build.__module__, config.server)
        except OSError as exc:  # the port: the workers never started
            return _failed(service.name, exc)
    bootstrap(config.server)
    try:
        serve(config.server, lambda: build(config), worker)
    except Exception as exc:  # noqa: BLE001 - once serving, stop() finishes whatever fails: this is start-up
        return _failed(service.name, exc, worker)
    return 0


def _failed(name: str, exc: Exception, worker: WorkerLink | None = None) -> int:
    is_config = isinstance(exc, ConfigError)
    what, status = ("configuration error", CONFIG_ERROR) if is_config else ("start-up failed", STARTUP_FAILED)
    log.error(what, exc_info=None if is_config else exc, extra={"fields": {"error": str(exc), "exit_status": status}})
    line = f"{name}: {what}: {exc}"
    if worker is not None:  # the supervisor prints it, after stopping the other workers
        worker.failed(status, line)
    else:
        print(line, file=sys.stderr, flush=True)  # last, so it is the output's last line
    return status


def serve(config: ServerConfig, start: Callable[[], Awaitable[Started]], worker: WorkerLink | None = None) -> None:
    """A service process's main loop: run_server on uvloop unless RAGFLEET_EVENT_LOOP=asyncio. Measured on the
    embedding service's remote path, uvloop cut the CPU per Embed RPC by ~17 % (1090 -> 900 us) for the same gRPC
    stack: every hop and every streamed token passes through the event loop.

    Service-to-service authentication (services.runtime.internal_auth) is read first: a missing or unreadable token
    or callers file raises ConfigError naming the variable."""
    auth = internal_auth.InternalAuth.load(internal_auth.InternalAuthConfig.from_env(config.component))
    internal_auth.install(auth.token)
    log.info("internal authentication", extra={"fields": {
        "callers": auth.authenticator.callers if auth.authenticator else "any (off or not an internal service)",
        "presents_token": auth.token is not None}})
    if config.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # not built for this platform (Windows): asyncio's loop works, only slower
            log.warning("uvloop is not installed; serving on asyncio's event loop")
        else:
            uvloop.run(run_server(config, start, auth, worker))
            return
    asyncio.run(run_server(config, start, auth, worker))
