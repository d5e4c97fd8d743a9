"""`ragfleet up` never orphans its services and restarts at once (issue 10, defects 7 and 8).

Real `ragfleet up` processes on loopback with a temporary data dir: closing the terminal (SIGHUP), a reader of its
stdout that goes away (`ragfleet up | head -3`) and a SIGKILL of `up` itself must all leave no service running; and
`up` stopped while a client held connections must start again at once on the same ports (TIME_WAIT sockets are no
reason to refuse). Every test finds the services by their data dir in /proc and kills whatever is left, pass or fail.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.mesh import SERVICES, port_in_use
from tests.unit.cli._up_output import START_TIMEOUT, Lines, banner_pids

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

GONE_WITHIN = 10.0  # seconds: an idle service drains and exits well inside this


def _env() -> dict[str, str]:
    return {**os.environ, "RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_REDIS_URL": "", "RAGFLEET_LLM_BASE_URL": ""}


def _up_command(data_dir: Path, port_base: int = 0) -> list[str]:
    """`up` as a terminal would start it, with SIGHUP at its default even when this test run was started under
    `nohup` (an ignored SIGHUP is inherited through exec, and `up` rightly keeps ignoring it then): the SIGHUP
    tests below would otherwise fail for how the suite was launched, not for `up`."""
    return [sys.executable, "-c", _SIGHUP_DEFAULT_THEN_EXEC, "-m", "services.cli", "up", "--port-base", str(port_base),
            "--data-dir", str(data_dir)]


_SIGHUP_DEFAULT_THEN_EXEC = ("import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def _mesh_pids(data_dir: Path) -> set[int]:
    """Every process whose environment points at this data dir: the services `up` started, orphaned or not."""
    needle = f"RAGFLEET_DATA_DIR={data_dir}\0".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.add(int(entry.name))
            except OSError:  # gone meanwhile, or not ours
                pass
    return pids


def _wait_gone(data_dir: Path, timeout: float = GONE_WITHIN) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := _mesh_pids(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _kill(process: subprocess.Popen | None, data_dir: Path) -> None:
    """Cleanup after pass or fail: `up` and every service with this data dir."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(10)
    for pid in _mesh_pids(data_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path, dict[str, int]]]:
    """A running `ragfleet up` on free ports, its data dir and its services' pids; everything killed afterwards."""
    data_dir = tmp_path / "data"
    process = subprocess.Popen(_up_command(data_dir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=_env())
    try:
        pids = banner_pids(Lines(process.stdout).wait_for("Ctrl-C stops everything."))
        assert sorted(pids) == sorted(SERVICES)
        assert set(pids.values()) <= _mesh_pids(data_dir)
        yield process, data_dir, pids
    finally:
        _kill(process, data_dir)


def test_sighup_to_up_stops_every_service(up: tuple[subprocess.Popen, Path, dict[str, int]]) -> None:
    """Closing the terminal sends `up` SIGHUP; the services run in their own sessions and never see it."""
    process, data_dir, _ = up
    process.send_signal(signal.SIGHUP)
    assert process.wait(30) == 0
    assert not _wait_gone(data_dir)


def test_closing_up_s_terminal_stops_every_service(tmp_path: Path) -> None:
    """The real thing: `up` leads a session on a pseudo-terminal that is then closed, so the kernel sends it SIGHUP
    and every later write to the terminal fails with EIO (which must not keep `up` from stopping the mesh)."""
    data_dir = tmp_path / "data"
    pid, terminal = pty.fork()
    if pid == 0:  # the child: exec at once, nothing else in a forked copy of the test process
        os.execve(sys.executable, _up_command(data_dir), _env())
    try:
        shown = b""
        deadline = time.monotonic() + START_TIMEOUT
        while b"Ctrl-C stops everything." not in shown and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.5)[0]:
                shown += os.read(terminal, 65536)
        assert set(banner_pids(shown.decode().replace("\r\n", "\n")).values()) <= _mesh_pids(data_dir), shown
        os.close(terminal)
        terminal = -1
        deadline = time.monotonic() + 30
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        if waited[0] == pid:
            pid = 0  # reaped: nothing left to kill under that number
        assert pid == 0 and os.waitstatus_to_exitcode(waited[1]) == 0, waited
        assert not _wait_gone(data_dir)
    finally:
        try:
            if terminal >= 0:
                os.close(terminal)
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        finally:
            _kill(None, data_dir)


def test_sigkill_of_up_takes_every_service_with_it(up: tuple[subprocess.Popen, Path, dict[str, int]]) -> None:
    """`up` gets no chance to clean up; the kernel tells each child that its parent died (PR_SET_PDEATHSIG)."""
    process, data_dir, _ = up
    process.kill()
    process.wait(10)
    assert not _wait_gone(data_dir)


def test_up_piped_into_head_stops_when_head_exits(tmp_path: Path) -> None:
    """`ragfleet up | head -3`: once the reader is gone `up` stops the mesh and exits by itself, no traceback."""
    data_dir = tmp_path / "data"
    head = subprocess.Popen(["head", "-3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process = None
    try:
        process = subprocess.Popen(_up_command(data_dir), stdin=subprocess.DEVNULL, stdout=head.stdin,
                                   stderr=subprocess.PIPE, text=True, env=_env())
        head.stdin.close()  # only `up` holds the pipe's write end now, as in a shell pipeline
        shown = head.stdout.read()
        assert head.wait(START_TIMEOUT) == 0
        assert "RAGFleet is up" in shown, shown
        code = process.wait(30)
        stderr = process.stderr.read()
        assert code == 141, stderr  # 128 + SIGPIPE, like any command whose output pipe closed
        assert "Traceback" not in stderr, stderr
        assert not _wait_gone(data_dir)
    finally:
        if head.poll() is None:
            head.kill()
        _kill(process, data_dir)


def _free_port_base(count: int = len(SERVICES)) -> int:
    """A base port with `count` free ports above it (well below the ephemeral range, so no client takes them)."""
    for base in range(23000, 30000, 10):
        if not any(port_in_use("127.0.0.1", base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


def _time_wait_ports(ports: set[int]) -> set[int]:
    """Local ports among `ports` with a TCP socket in TIME_WAIT (state 06; gRPC's sockets are IPv6, v4-mapped)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "06" and port in ports:
                found.add(port)
    return found


def test_up_restarts_at_once_on_the_same_ports_after_serving_clients(tmp_path: Path) -> None:
    """Stopping while a client is connected leaves the servers' side of those connections in TIME_WAIT for ~60 s;
    the gRPC server binds with SO_REUSEADDR and would not mind, so neither may `up`'s port check."""
    data_dir = tmp_path / "data"
    base = _free_port_base()
    ports = {base + i for i in range(len(SERVICES))}
    process = None
    try:
        process = subprocess.Popen(_up_command(data_dir, base), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=_env())
        Lines(process.stdout).wait_for("Ctrl-C stops everything.")
        assert all(port_in_use("127.0.0.1", port) for port in ports)  # gRPC's (IPv6, v4-mapped) listeners count
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in sorted(ports)]
        try:
            for channel in channels:  # a connection to every service, each with a call in flight when `up` stops
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
                       for channel in channels]
            assert all(next(watch).status == health_pb2.HealthCheckResponse.SERVING for watch in watches)
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
        finally:
            for channel in channels:
                channel.close()
        assert not _wait_gone(data_dir)
        assert _time_wait_ports(ports), "the stop left no TIME_WAIT socket: the test would prove nothing"

        process = subprocess.Popen(_up_command(data_dir, base), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=_env())
        lines = Lines(process.stdout)
        try:
            lines.wait_for("Ctrl-C stops everything.")
        except AssertionError:
            process.kill()
            raise AssertionError(f"restart refused: {process.stderr.read()}") from None
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        _kill(process, data_dir)


def test_port_check_still_sees_a_listening_socket_but_not_time_wait() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's listeners (and accepted sockets)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end goes to TIME_WAIT
            client.recv(1)
    assert _time_wait_ports({port}) == {port}
    assert not port_in_use("127.0.0.1", port)
