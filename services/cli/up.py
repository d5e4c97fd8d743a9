"""`ragfleet up`: run the whole mesh locally, one process per service, until Ctrl-C.

Every service runs on its embedded default backend (ONNX embeddings, the in-process Qdrant engine, the offline
extractive answerer unless RAGFLEET_LLM_BASE_URL is set), so nothing but this package is needed. Any RAGFLEET_* or
OTEL_* variable in the environment is passed to every service.

    ragfleet up                        # gateway 127.0.0.1:50050, embedding :50051, retrieval :50052, generation :50053
    ragfleet up --port-base 0          # free ports instead (several meshes side by side)
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from services.cli.mesh import SERVICES, LocalMesh, MeshError
from services.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, data_dir

# Offsets from --port-base follow the runtime's fixed defaults: gateway 50050, embedding 50051, ...
_PORT_OFFSETS = {name: port - DEFAULT_PORTS["gateway"] for name, port in DEFAULT_PORTS.items()}
_METRICS_OFFSETS = {name: port - DEFAULT_METRICS_PORTS["gateway"] for name, port in DEFAULT_METRICS_PORTS.items()}
SAMPLE_CORPUS = Path(__file__).resolve().parent / "sample_corpus"
DEFAULT_START_TIMEOUT = 180.0
POLL_SECONDS = 0.5


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
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                raise MeshError(f"port {port} for {name} is in use on {host}: is another `ragfleet up` running? "
                                "Stop it or pass --port-base (0 = free ports).") from None


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


@contextmanager
def running_mesh(mesh: LocalMesh, *, timeout: float, out: TextIO) -> Iterator[float]:
    """Start every service, yield the cold-start seconds, and always stop them all on the way out.

    SIGTERM is turned into KeyboardInterrupt so `kill` stops the mesh as cleanly as Ctrl-C; while stopping, further
    signals are ignored so a second Ctrl-C cannot orphan half-stopped children (they run in their own sessions).
    """
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        started = time.monotonic()
        print(f"starting {', '.join(SERVICES)} (logs in {mesh.log_dir}) ...", file=out, flush=True)
        mesh.start(timeout=timeout)
        yield time.monotonic() - started
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if mesh.processes:
                print("stopping ...", file=out, flush=True)
                codes = mesh.stop()
                bad = {name: code for name, code in codes.items() if code not in (0, -signal.SIGTERM)}
                if bad:
                    print(f"unclean exits: {bad}", file=out, flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


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
    print("\n".join(lines), file=out, flush=True)


def supervise(mesh: LocalMesh, out: TextIO) -> int:
    """Block until Ctrl-C/SIGTERM (-> 0) or until a service dies (-> 1, with its log tail).

    Here the signals only set a flag: a KeyboardInterrupt raised inside `Popen.poll()` can leave the Popen's wait
    lock held, and the `wait()` of the shutdown that follows then never returns.
    """
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(POLL_SECONDS):
            dead = mesh.exited()
            if dead is not None:
                print(f"\n{dead.name} exited with code {dead.process.returncode}; last lines of {dead.log_path}:\n"
                      f"{dead.log_tail()}", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def resolve_data_dir(arg: str | None) -> Path:
    return Path(arg or data_dir()).expanduser().resolve()


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        mesh = build_mesh(args, resolve_data_dir(args.data_dir))
        with running_mesh(mesh, timeout=args.start_timeout, out=out) as cold_start:
            print_banner(mesh, cold_start, out)
            return supervise(mesh, out)
    except MeshError as exc:
        print(f"ragfleet up failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before the mesh was up", file=sys.stderr)
        return 130
