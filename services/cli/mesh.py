"""Start RAGFleet services as real local processes on loopback and wait until they report SERVING.

Used by `ragfleet up`, by the integration tests and by the benchmarks, so all three run the mesh the same way.

    with LocalMesh(data_dir=tmp, env={"RAGFLEET_LLM_BASE_URL": sim_url}) as mesh:
        mesh.start()                       # all four services, free ports, health-checked
        channel = grpc.insecure_channel(mesh.address("gateway"))
"""

from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.internal_auth import TOKEN_FILE_VAR, write_local_credentials
from services.runtime.workers import die_with_parent

SERVICES = ("embedding", "retrieval", "generation", "gateway")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the source ports of outgoing connections (Linux; the usual default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_LOW_PORT = 10000
_next_port = [0]  # this process's cursor through [_LOW_PORT, the ephemeral range's start)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a service to bind later. Taken below the ephemeral range: a port from bind(0)
    lies inside it, where any outgoing connection on the machine may take it as its source port before the service
    binds it ("Address already in use", a CI failure on 2026-12-06). Handed out in turn from a random start, so one
    process never hands out the same port twice in a row; bind(0) only when the range below is too small."""
    low = _LOW_PORT
    high = _ephemeral_ports()[0]
    if high - low < 1000:
        with socket.socket(_family(host)) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]
    if not _next_port[0]:
        _next_port[0] = low + int.from_bytes(os.urandom(2), "big") % (high - low)
    for _ in range(high - low):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < high else low
        if not port_in_use(host, port):
            return port
    raise OSError(f"no free port on {host} in {low}-{high - 1}")


def port_in_use(host: str, port: int) -> bool:
    """Whether a gRPC server could not listen on host:port. Binds as the server does (SO_REUSEADDR, no SO_REUSEPORT):
    a listening socket there still counts, the TIME_WAIT leftovers of connections it closed (~60 s) do not."""
    with socket.socket(_family(host)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return True
    return False


@dataclass
class ServiceProcess:
    name: str
    port: int
    metrics_port: int
    process: subprocess.Popen
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class MeshError(RuntimeError):
    pass


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (a service token) to every call of a synchronous channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details):  # type: ignore[no-untyped-def]
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)


class _FixedToken:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # type: ignore
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class LocalMesh:
    """A set of service processes. Env passed in applies to all; `service_env[name]` to one service."""

    def __init__(self, *, data_dir: str | os.PathLike, env: Mapping[str, str] | None = None,
                 service_env: Mapping[str, Mapping[str, str]] | None = None, host: str = "127.0.0.1",
                 log_dir: str | os.PathLike | None = None, ports: Mapping[str, int] | None = None,
                 metrics_ports: Mapping[str, int] | None = None,
                 credentials: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """`ports` / `metrics_ports` pin a service's gRPC / Prometheus port (`ragfleet up`); others get free ones.
        Service-to-service tokens are generated under the data dir on start (removed on stop); `credentials` (another
        mesh's `.credentials`) reuses that mesh's instead, so these processes and its services accept each other."""
        self.credentials: dict[str, dict[str, str]] | None = (
            None if credentials is None else {k: dict(v) for k, v in credentials.items()})
        self._credentials_dir: Path | None = None
        self.data_dir = Path(data_dir)
        self.host = host
        self.env = dict(env or {})
        self.service_env = {k: dict(v) for k, v in (service_env or {}).items()}
        self.log_dir = Path(log_dir) if log_dir else self.data_dir / "logs"
        self.processes: dict[str, ServiceProcess] = {}
        self.ports: dict[str, int] = dict(ports or {})
        self.metrics_ports: dict[str, int] = dict(metrics_ports or {})

    def address(self, name: str) -> str:
        return f"{self.host}:{self.ports[name]}"

    def _env_for(self, name: str, metrics_port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("RAGFLEET_DATA_DIR", str(self.data_dir))
        env.update((self.credentials or {}).get(name, {}))
        env.update(self.env)
        prefix = f"RAGFLEET_{name.upper()}_"
        env[prefix + "HOST"] = self.host
        env[prefix + "PORT"] = str(self.ports[name])
        env[prefix + "METRICS_PORT"] = str(metrics_port)
        for upstream in ("embedding", "retrieval", "generation"):
            if upstream in self.ports:
                env[f"RAGFLEET_GATEWAY_{upstream.upper()}_ADDRESS"] = self.address(upstream)
        if "embedding" in self.ports:
            env.setdefault("RAGFLEET_RETRIEVAL_EMBEDDING_ADDRESS", self.address("embedding"))
        env.update(self.service_env.get(name, {}))
        return env

    def start(self, names: Iterable[str] = SERVICES, *, timeout: float = 120.0) -> "LocalMesh":
        names = list(names)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.credentials is None:
            self._credentials_dir = Path(tempfile.mkdtemp(prefix="internal-auth-", dir=self.data_dir))
            self.credentials = write_local_credentials(self._credentials_dir)
        for name in names:
            self.ports.setdefault(name, free_port(self.host))
        for name in names:
            self._spawn(name)
        try:
            for name in names:
                self.wait_serving(name, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, name: str, *, timeout: float = 120.0) -> ServiceProcess:
        """Start `name` again on its ports, environment and data dir, and wait until SERVING. A process still running
        is SIGKILLed first (the fault tests' crash and recovery)."""
        old = self.processes[name]
        if old.process.poll() is None:
            old.process.kill()
            old.process.wait(10)
        if old._log is not None:
            old._log.close()
        self._spawn(name)
        self.wait_serving(name, timeout=timeout)
        return self.processes[name]

    def _spawn(self, name: str) -> ServiceProcess:
        metrics_port = self.metrics_ports.setdefault(name, free_port(self.host))
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # appended: a restart keeps the log of the run before it
        process = subprocess.Popen([sys.executable, "-m", f"services.{name}"],
                                   env={**self._env_for(name, metrics_port), **die_with_parent()},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = ServiceProcess(name, self.ports[name], metrics_port, process, log_path, log)
        return self.processes[name]

    def wait_serving(self, name: str, *, timeout: float = 120.0) -> None:
        proc = self.processes[name]
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(proc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.process.poll() is not None:
                    raise MeshError(f"{name} exited with code {proc.process.returncode} during start-up:\n"
                                    f"{proc.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise MeshError(f"{name} not SERVING after {timeout:.0f}s:\n{proc.log_tail()}")
                time.sleep(0.1)

    def exited(self) -> ServiceProcess | None:
        """The first service process that is no longer running, if any (a supervisor polls this)."""
        return next((p for p in self.processes.values() if p.process.poll() is not None), None)

    def stop(self, *, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every process (graceful drain), SIGKILL what is left after `timeout`; returns exit codes."""
        for proc in self.processes.values():
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, proc in self.processes.items():
            try:
                codes[name] = proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                codes[name] = proc.process.wait()
            if proc._log is not None:
                proc._log.close()
        self.processes.clear()
        if self._credentials_dir is not None:
            shutil.rmtree(self._credentials_dir, ignore_errors=True)
            self._credentials_dir = self.credentials = None
        return codes

    def internal_metadata(self, caller: str = "gateway") -> tuple[tuple[str, str], ...]:
        """The metadata `caller` (gateway or retrieval) presents to the internal services, for calling them
        directly: `stub.Search(request, metadata=mesh.internal_metadata())`. Read now, so it follows a rotation."""
        if self.credentials is None:
            raise MeshError("the mesh has no service tokens before start()")
        token = Path(self.credentials[caller][TOKEN_FILE_VAR]).read_text().strip()
        return (("authorization", f"Bearer {token}"),)

    def internal_channel(self, name: str, *, caller: str = "gateway", aio: bool = False,
                         options: list[tuple[str, object]] | None = None) -> grpc.Channel | grpc.aio.Channel:
        """A channel to service `name` whose every call presents `caller`'s service token (sync, or grpc.aio)."""
        metadata = self.internal_metadata(caller)
        if aio:
            from services.runtime.internal_auth import token_interceptors

            return grpc.aio.insecure_channel(self.address(name), options=options,
                                             interceptors=token_interceptors(_FixedToken(metadata)))  # type: ignore
        return grpc.intercept_channel(grpc.insecure_channel(self.address(name), options=options),
                                      _SyncToken(metadata))

    def __enter__(self) -> "LocalMesh":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
