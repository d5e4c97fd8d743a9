"""`ragfleet up`: run the whole mesh locally, one process per service, until Ctrl-C.

Every service runs on its embedded default backend (ONNX embeddings, the in-process Qdrant engine, the offline
extractive answerer unless RAGFLEET_LLM_BASE_URL is set), so nothing but this package is needed. Any RAGFLEET_* or
OTEL_* variable in the environment is passed to every service.

    ragfleet up                        # gateway 127.0.0.1:50050, embedding :50051, retrieval :50052, generation :50053
    ragfleet up --port-base 0          # free ports instead (several meshes side by side)
    RAGFLEET_GENERATION_WORKERS=auto ragfleet up   # generation on every core, one port (services/runtime/workers.py)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import stat
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from services.cli.mesh import SERVICES, LocalMesh, MeshError, port_in_use
from services.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, data_dir

# Offsets from --port-base follow the runtime's fixed defaults: gateway 50050, embedding 50051, ...
_PORT_OFFSETS = {name: port - DEFAULT_PORTS["gateway"] for name, port in DEFAULT_PORTS.items()}
_METRICS_OFFSETS = {name: port - DEFAULT_METRICS_PORTS["gateway"] for name, port in DEFAULT_METRICS_PORTS.items()}
SAMPLE_CORPUS = Path(__file__).resolve().parent / "sample_corpus"
DEFAULT_START_TIMEOUT = 180.0
POLL_SECONDS = 0.5
OUTPUT_GONE_EXIT = 128 + 13  # 128 + SIGPIPE: what a shell reports for a command whose output pipe closed
# Each stops the mesh cleanly: Ctrl-C, `kill`, and closing the terminal (the services run in their own sessions and
# never see the terminal's SIGHUP, so without this they would outlive `up`).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def add_mesh_arguments(parser: argparse.ArgumentParser, *, port_base: int) -> None:
    """Options shared by `up` and `demo`."""
    parser.add_argument("--port-base", type=int, default=port_base,
                        help="gateway on BASE, embedding BASE+1, retrieval BASE+2, generation BASE+3; "
                             f"0 picks free ports (default {port_base})")
    parser.add_argument("--metrics-port-base", type=int, default=None,
                        help=f"Prometheus ports BASE..BASE+3 (default {DEFAULT_METRICS_PORTS['gateway']} with the "
                             "default --port-base, free ports otherwise)")
    parser.add_argument("--host", default="127.0.0.1", help="address the services bind (default 127.0.0.1)")
    parser.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT,
                        help="seconds to wait for every service to report SERVING")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mesh_arguments(parser, port_base=DEFAULT_PORTS["gateway"])
    parser.add_argument("--data-dir", default=None,
                        help="where services keep their data and logs (default $RAGFLEET_DATA_DIR or ./.ragfleet)")


def pinned_ports(base: int, offsets: dict[str, int]) -> dict[str, int]:
    return {name: base + offsets[name] for name in SERVICES} if base else {}


def _check_free(host: str, ports: dict[str, int]) -> None:
    """Fail before spawning anything when a fixed port is taken (usually another `ragfleet up`)."""
    for name, port in ports.items():
        if port_in_use(host, port):
            raise MeshError(f"port {port} for {name} is in use on {host}: is another `ragfleet up` running? "
                            "Stop it or pass --port-base (0 = free ports).")


def build_mesh(args: argparse.Namespace, data: Path) -> LocalMesh:
    ports = pinned_ports(args.port_base, _PORT_OFFSETS)
    metrics_base = args.metrics_port_base
    if metrics_base is None:
        metrics_base = DEFAULT_METRICS_PORTS["gateway"] if args.port_base == DEFAULT_PORTS["gateway"] else 0
    _check_free(args.host, ports)
    # An explicit data dir wins over an inherited RAGFLEET_DATA_DIR.
    return LocalMesh(data_dir=data, env={"RAGFLEET_DATA_DIR": str(data)}, host=args.host, ports=ports,
                     metrics_ports=pinned_ports(metrics_base, _METRICS_OFFSETS))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def output_gone(exc: BaseException) -> bool:
    """A write to a closed pipe (`ragfleet up | head -3`) or to a hung-up terminal."""
    return isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.EIO)


def silence(*streams: TextIO) -> None:
    """Point a dead stream's descriptor at /dev/null, so later writes and the interpreter's final flush succeed."""
    for stream in streams:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor behind it (a test's StringIO): nothing to do
            pass


def say(text: str, out: TextIO) -> bool:
    """print() that never raises for a dead terminal or pipe (and silences it): stopping must not depend on it."""
    try:
        print(text, file=out, flush=True)
        return True
    except OSError as exc:
        if not output_gone(exc):
            raise
        silence(out)
        return False


def _handle(signals: tuple[int, ...], handler: object) -> dict[int, object]:
    """Install `handler` for each signal, except a SIGHUP ignored by whoever started us (`nohup ragfleet up`)."""
    previous = {}
    for sig in signals:
        if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def running_mesh(mesh: LocalMesh, *, timeout: float, out: TextIO) -> Iterator[float]:
    """Start every service, yield the cold-start seconds, and always stop them all on the way out.

    SIGTERM and SIGHUP are turned into KeyboardInterrupt so `kill` and a closed terminal stop the mesh as cleanly as
    Ctrl-C; while stopping, further signals are ignored so a second Ctrl-C cannot orphan half-stopped children (they
    run in their own sessions), and output that can no longer be written is dropped rather than raised.
    """
    previous = _handle(STOP_SIGNALS[1:], _raise_interrupt)
    try:
        started = time.monotonic()
        say(f"starting {', '.join(SERVICES)} (logs in {mesh.log_dir}) ...", out)
        mesh.start(timeout=timeout)
        yield time.monotonic() - started
    finally:
        during_stop = _handle(STOP_SIGNALS, signal.SIG_IGN)
        try:
            if mesh.processes:
                say("stopping ...", out)
                codes = mesh.stop()
                bad = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
                if bad:
                    say(f"unclean exits: {bad}", out)
        finally:
            _restore(during_stop)
            _restore(previous)


def print_banner(mesh: LocalMesh, cold_start: float, out: TextIO) -> None:
    gateway = mesh.address("gateway")
    lines = [f"RAGFleet is up ({cold_start:.1f} s cold start)."]
    for name in SERVICES:
        proc = mesh.processes[name]
        lines.append(f"  {name:<11} {mesh.address(name):<22} metrics :{proc.metrics_port}  pid {proc.process.pid}")
    lines += [
        f"  data        {mesh.data_dir}",
        "",
        "Try:",
        f"  ragfleet ingest --gateway {gateway} {SAMPLE_CORPUS}   # or any .txt/.md files, a BEIR corpus.jsonl",
        f"  ragfleet ask --gateway {gateway} \"your question\"",
        f"  grpcurl -plaintext {gateway} list",
        f"  grpcurl -plaintext -d '{{\"question\": \"How do honeybees find food?\"}}' {gateway} "
        "ragfleet.v1.GatewayService/Ask",
        "",
        "Ctrl-C stops everything.",
    ]
    # One write, newline included: a reader may close the terminal as soon as it has read the last line, and a
    # write still due then (print's own end="\n") would fail with EIO and end `up` with 141 instead of the SIGHUP's 0.
    out.write("\n".join(lines) + "\n")
    out.flush()


def _reader_gone(streams: tuple[TextIO, ...]) -> TextIO | None:
    """The first stream that is a pipe or socket whose reader has gone (poll reports POLLERR/POLLHUP).

    Terminals are left to SIGHUP: a job the shell was told to keep (`disown`) outlives its terminal on purpose.
    """
    if not hasattr(select, "poll"):
        return None
    for stream in streams:
        try:
            fd = stream.fileno()
            if not (stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)):
                continue
            poller = select.poll()
            poller.register(fd, 0)  # no events asked for: only error and hang-up are reported
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                return stream
        except (OSError, ValueError, AttributeError):
            continue
    return None


def supervise(mesh: LocalMesh, out: TextIO, stop: threading.Event) -> int:
    """Block until `stop` is set by Ctrl-C/SIGTERM/SIGHUP (-> 0), until a service dies (-> 1, with its log tail), or
    until whoever reads our output has gone (`ragfleet up | head -3` -> 141, as the pipeline's other commands would
    end).

    Here the signals only set a flag (see `stop_flag`): a KeyboardInterrupt raised inside `Popen.poll()` can leave the
    Popen's wait lock held, and the `wait()` of the shutdown that follows then never returns.
    """
    while not stop.wait(POLL_SECONDS):
        dead = mesh.exited()
        if dead is not None:
            say(f"\n{dead.name} exited with code {dead.process.returncode}; last lines of {dead.log_path}:\n"
                f"{dead.log_tail()}", sys.stderr)
            return 1
        gone = _reader_gone((out, sys.stderr))
        if gone is not None:
            silence(gone)
            say(f"ragfleet up: {'stdout' if gone is out else 'stderr'} was closed; stopping the mesh", sys.stderr)
            return OUTPUT_GONE_EXIT
    return 0


@contextlib.contextmanager
def stop_flag() -> Iterator[threading.Event]:
    """An event the stop signals set, installed BEFORE the banner says Ctrl-C works: a Ctrl-C sent as soon as the
    banner is read would otherwise meet Python's default handler and end `up` with 130 instead of a clean 0."""
    stop = threading.Event()
    handlers = _handle(STOP_SIGNALS, lambda *_: stop.set())
    try:
        yield stop
    finally:
        _restore(handlers)


def resolve_data_dir(arg: str | None) -> Path:
    return Path(arg or data_dir()).expanduser().resolve()


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        mesh = build_mesh(args, resolve_data_dir(args.data_dir))
        with running_mesh(mesh, timeout=args.start_timeout, out=out) as cold_start, stop_flag() as stop:
            print_banner(mesh, cold_start, out)
            return supervise(mesh, out, stop)
    except MeshError as exc:
        say(f"ragfleet up failed: {exc}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        say("interrupted before the mesh was up", sys.stderr)
        return 130
    except OSError as exc:  # the banner met a closed pipe or terminal; the mesh is already stopped
        if not output_gone(exc):
            raise
        silence(out)
        say("ragfleet up: stdout was closed; stopped the mesh", sys.stderr)
        return OUTPUT_GONE_EXIT
