"""Several worker processes of one service on one port (SO_REUSEPORT), so a machine or a pod uses all its cores.

``RAGFLEET_GATEWAY_WORKERS`` / ``RAGFLEET_GENERATION_WORKERS`` > 1 makes ``serve.main`` a supervisor:

    supervisor (ragfleet serve gateway)       reserves the port, serves /metrics for all workers, forwards signals
      +- worker 0 (python -m services.runtime._worker services.gateway.server 0 <fd>)   grpc + health, same port
      +- worker 1 ...                                                                   the kernel spreads connections

Each worker builds the service and serves gRPC and health itself, talking to the supervisor over a socket pair:
it reports "built" once its service is built and then waits for the supervisor's go, which comes once every worker
has built, so no worker listens (and the port's health, answered by whichever worker takes the connection, says
SERVING) while another is still loading; then it reports "ready", or at any point the one-line reason it failed. The
supervisor exits with the failing worker's status (2 configuration, 3 start-up) and prints its line last.
SIGTERM/SIGINT go to every worker (each drains as a single process does). A worker that dies while serving is not
restarted: the others drain and the supervisor exits with the dead worker's status, as one process would, so
`ragfleet up` and Kubernetes see the crash and restart the whole service (with their back-off) rather than a
restart loop hiding it. Metrics use prometheus_client's multiprocess mode in a per-run temporary
directory: one scrape of the supervisor's port sums the workers (gauges by their ``multiprocess_mode``). The
supervisor removes it on the way out; one it could not remove (it was SIGKILLed) is removed by the next supervisor
that starts, once the last process of that run has exited: each run's supervisor and workers hold a lock on it.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from services.runtime.config import DIE_WITH_PARENT, METRICS_PORT, PORT, ServerConfig

log = logging.getLogger("ragfleet.workers")

WORKER_MODULE = "services.runtime._worker"
KILL_AFTER_GRACE_SECONDS = 10.0  # a worker still running this long after its grace is SIGKILLed
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's limit), at least 1. A
    fractional quota rounds down, as Go's automaxprocs does: more busy workers than the quota only get throttled."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cpus, math.floor(quota)) if quota else cpus)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


DIE_WITH_PARENT_ENV = DIE_WITH_PARENT.name


def die_with_parent() -> dict[str, str]:
    """Environment for a child that Linux should SIGTERM (a graceful drain) when this process dies, even by SIGKILL,
    so a killed `ragfleet up`, supervisor or test run never leaves services holding ports and the data-dir lock. The
    child arms it itself as it starts (`arm_parent_death_signal`, called by `serve.main`).

    Not a `preexec_fn`: that forces fork() where subprocess would vfork, so gRPC's fork handlers run in the child,
    restart gRPC's poller thread there, and close_fds then closes the poller's epoll descriptor: now and then the
    child aborted before exec ("epoll_wait error: Bad file descriptor", exit -6; grpc/grpc#43055).

    Empty elsewhere, and off the main thread: the kernel signals when the spawning *thread* exits, and a worker
    thread (asyncio.to_thread) may end long before the mesh should.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return {}
    return {DIE_WITH_PARENT_ENV: str(os.getpid())}


def arm_parent_death_signal(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """In a child started with `die_with_parent()`'s environment: ask Linux for SIGTERM when the parent dies, and
    exit at once if it already has. The variable is removed, so this process's own children do not inherit it.
    Returns whether the signal was armed."""
    parent = environ.pop(DIE_WITH_PARENT_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl took effect: no signal will ever come
        os._exit(1)
    return True


@dataclass(frozen=True)
class WorkerLink:
    """A worker's end of its socket pair with the supervisor: JSON lines up (``{"built": true}``, then
    ``{"ready": true}``, or its exit status and stderr line), one go line down once every worker has built."""

    index: int
    fd: int

    async def built(self) -> None:
        """Report this worker's service built and wait for the supervisor's go (every worker has built), so that
        this worker listens, and its health says SERVING, only once all of them can serve."""
        self._write({"built": True})
        loop = asyncio.get_running_loop()
        with socket.socket(fileno=os.dup(self.fd)) as sock:
            sock.setblocking(False)
            received = b""
            while not received.endswith(b"\n"):
                chunk = await loop.sock_recv(sock, 64)
                if not chunk:
                    raise RuntimeError("the supervisor went away before every worker was built")
                received += chunk
            sock.setblocking(True)  # the flag is the descriptor's, shared with self.fd: its writes block again

    def ready(self) -> None:
        self._send({"ready": True, "pid": os.getpid()})

    def failed(self, status: int, line: str) -> None:
        self._send({"status": status, "line": line})

    def _write(self, message: dict[str, Any]) -> None:
        try:
            os.write(self.fd, json.dumps(message).encode() + b"\n")
        except OSError:  # the supervisor is gone: the death signal follows
            pass

    def _send(self, message: dict[str, Any]) -> None:
        self._write(message)
        try:
            os.close(self.fd)
        except OSError:
            pass


def build_when_all_built(build: Callable[[Any], Awaitable[Any]], link: WorkerLink) -> Callable[[Any], Awaitable[Any]]:
    """A worker's ``build``: the service's, then the wait for every other worker's (``WorkerLink.built``)."""

    async def built_with_the_others(config: Any) -> Any:
        started = await build(config)
        await link.built()
        return started

    return built_with_the_others


class StartupFailed(Exception):
    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status, self.line = status, line


def reserve_port(host: str, port: int) -> socket.socket:
    """Hold ``host:port`` for the workers: refuse a port something already listens on (SO_REUSEPORT alone would let
    the workers join another server's group), then keep a bound, never-listening SO_REUSEPORT socket, which takes
    no connections but keeps other programs off the port and turns port 0 into one port for all workers."""
    host = host.strip("[]")  # "[::]" as in a gRPC address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:  # bound as a single gRPC server binds: only TIME_WAIT leftovers are fine
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if port:
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise OSError(f"could not bind {host}:{port}: is the port in use? ({exc.strerror})") from None
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class _Worker:
    def __init__(self, index: int, process: asyncio.subprocess.Process, report: asyncio.StreamReader,
                 go: asyncio.StreamWriter) -> None:
        self.index, self.process, self._report, self._go = index, process, report, go

    @property
    def pid(self) -> int:
        return self.process.pid

    async def built(self, name: str) -> None:
        """Until the worker has built its service; StartupFailed with its status and line if it fails or exits
        first."""
        await self._expect("built", name)

    def go(self) -> None:
        """Let the worker listen and serve (every worker has built)."""
        self._go.write(b"serve\n")

    async def started(self, name: str) -> None:
        """Until the worker reports ready; StartupFailed with its status and line if it fails or exits first."""
        await self._expect("ready", name)

    def close(self) -> None:
        self._go.close()

    async def _expect(self, what: str, name: str) -> None:
        line = await self._report.readline()
        message = json.loads(line) if line.strip() else {}
        if message.get(what):
            return
        if "status" in message:
            raise StartupFailed(int(message["status"]), str(message["line"]))
        code = await self.process.wait()
        from services.runtime.serve import STARTUP_FAILED

        raise StartupFailed(STARTUP_FAILED, f"{name}: start-up failed: worker {self.index} exited with status {code}")

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)


async def _spawn(index: int, module: str, env: dict[str, str], hold_fd: int) -> _Worker:
    """Start worker ``index``; it inherits ``hold_fd`` (the run's lock on its metrics directory) and keeps it."""
    ours, theirs = socket.socketpair()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WORKER_MODULE, module, str(index), str(theirs.fileno()),
            env={**env, **die_with_parent()}, pass_fds=(theirs.fileno(), hold_fd))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    report, go = await asyncio.open_unix_connection(sock=ours)
    return _Worker(index, process, report, go)


def exit_status(code: int) -> int:
    """A worker's return code as a shell shows it: 128 + N for a death by signal N."""
    return code if code >= 0 else 128 - code


def _mark_dead(pid: int, directory: str) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)


METRICS_DIR_PREFIX = "ragfleet-metrics-"


def metrics_directory(name: str, root: str | None = None) -> tuple[str, int]:
    """A fresh directory under ``root`` (the temporary directory) for one run's multiprocess metrics, and a
    descriptor holding an exclusive lock on it, which the run's workers inherit: the lock lasts until the last
    process of the run exits, however it ends. First removes the directories of runs that hold none any more."""
    root = root or tempfile.gettempdir()
    remove_stale_metrics_directories(root)
    while True:
        path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{name}-", dir=root)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return path, fd
        except OSError:  # another supervisor's sweep took it between mkdtemp and the lock: make another
            pass
        os.close(fd)


def remove_stale_metrics_directories(root: str) -> list[str]:
    """Remove the metrics directories under ``root`` whose lock no process holds (their supervisor was SIGKILLed
    and its workers have exited since); returns them. Directories of runs still going, other users' and links are
    left alone."""
    removed = []
    for path in sorted(Path(root).glob(METRICS_DIR_PREFIX + "*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # gone since, not a directory, a link, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a process of that run still holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(path)
            removed.append(str(path))
        except OSError as exc:
            log.warning("could not remove a stale metrics directory", extra={"fields": {
                "path": str(path), "error": str(exc)}})
        finally:
            os.close(fd)
    if removed:
        log.info("removed stale metrics directories", extra={"fields": {"paths": removed}})
    return removed


class Supervisor:
    """Runs ``config.workers`` workers of the service whose ``SERVICE`` and ``build`` live in ``module``."""

    def __init__(self, name: str, module: str, config: ServerConfig) -> None:
        self.name, self.module, self.config = name, module, config
        self.workers: list[_Worker] = []
        self._stop = asyncio.Event()
        self._metrics_dir = ""
        self._metrics_lock = -1

    async def run(self) -> int:
        reserved = reserve_port(self.config.host, self.config.port)
        self._metrics_dir, self._metrics_lock = metrics_directory(self.name)
        try:
            return await self._run(reserved.getsockname()[1])
        finally:
            reserved.close()
            for worker in self.workers:
                worker.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            os.close(self._metrics_lock)

    async def _run(self, port: int) -> int:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
               PORT.for_service(self.name).name: str(port), METRICS_PORT.for_service(self.name).name: "0"}
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        for index in range(self.config.workers):
            self.workers.append(await _spawn(index, self.module, env, self._metrics_lock))
        if self._stop.is_set():  # a signal came while spawning: the workers started after it have not seen it
            self._signal_all(signal.SIGTERM)
        exits = {w.pid: asyncio.ensure_future(w.process.wait()) for w in self.workers}
        for pid, exited in exits.items():  # its live* gauges leave the scrape with it
            exited.add_done_callback(lambda _, pid=pid: _mark_dead(pid, self._metrics_dir))
        try:
            await asyncio.gather(*(w.built(self.name) for w in self.workers))
            for worker in self.workers:  # all built: now they may listen, and their health say SERVING
                worker.go()
            await asyncio.gather(*(w.started(self.name) for w in self.workers))
        except StartupFailed as failure:
            self._signal_all(signal.SIGTERM)
            await self._reap(exits)
            if self._stop.is_set():  # stopped while starting: a worker killed by our SIGTERM is no failure
                return 0
            log.error("a worker failed to start", extra={"fields": {"exit_status": failure.status}})
            print(failure.line, file=sys.stderr, flush=True)  # last, as a single process's line would be
            return failure.status
        self._serve_metrics()
        log.info("workers serving", extra={"fields": {"address": f"{self.config.host}:{port}", "workers": [
            w.pid for w in self.workers], "metrics_port": self.config.metrics_port}})
        stopped = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait([stopped, *exits.values()], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        status = 0
        dead = next((w for w in self.workers if exits[w.pid] in done), None)
        if dead is not None and not self._stop.is_set():
            status = exit_status(exits[dead.pid].result())
            # Exit 0 means someone stopped that worker gracefully: stop the service the same way.
            (log.info if status == 0 else log.error)("worker exited; stopping the others", extra={"fields": {
                "worker": dead.index, "pid": dead.pid, "exit_status": status}})
            self._signal_all(signal.SIGTERM)
        codes = await self._reap(exits)
        return status or next((exit_status(c) for c in codes if c not in (0, -signal.SIGTERM, -signal.SIGINT)), 0)

    def _on_signal(self, sig: int) -> None:
        self._stop.set()
        self._signal_all(sig)

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            worker.signal(sig)

    async def _reap(self, exits: dict[int, "asyncio.Future[int]"]) -> list[int]:
        """Wait for every worker (SIGKILL past its grace)."""
        limit = self.config.grace_seconds + KILL_AFTER_GRACE_SECONDS
        _, late = await asyncio.wait(exits.values(), timeout=limit)
        for worker in self.workers:
            if exits[worker.pid] in late:
                log.error("worker did not stop in time; killing it", extra={"fields": {"pid": worker.pid}})
                worker.signal(signal.SIGKILL)
        return [await exits[w.pid] for w in self.workers]

    def _serve_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        registry.register(WorkerProcessCollector(lambda: [w.pid for w in self.workers
                                                          if w.process.returncode is None]))
        try:
            start_http_server(self.config.metrics_port, addr=self.config.host, registry=registry)
        except OSError as exc:
            log.warning("metrics port %s unavailable (%s); metrics disabled", self.config.metrics_port, exc)


class WorkerProcessCollector:
    """The standard ``process_*`` metrics for the workers together (multiprocess mode has none): CPU seconds,
    memory and open descriptors summed, the earliest start time, so dashboards on process_cpu_seconds_total stay
    right."""

    _SUMMED = ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
               "process_open_fds")

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterable[Any]:
        from prometheus_client import ProcessCollector
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        merged: dict[str, Any] = {}
        for pid in self._pids():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                sample = family.samples[0]
                if family.name not in merged:
                    merged[family.name] = (family, sample.value)
                elif sample.name in self._SUMMED:
                    merged[family.name] = (family, merged[family.name][1] + sample.value)
                elif sample.name == "process_start_time_seconds":
                    merged[family.name] = (family, min(merged[family.name][1], sample.value))
        for family, value in merged.values():
            kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
            yield kind(family.name, family.documentation, value=value)


def supervise(name: str, module: str, config: ServerConfig) -> int:
    """The supervisor's process: returns its exit status (see the module docstring)."""
    return asyncio.run(Supervisor(name, module, config).run())
