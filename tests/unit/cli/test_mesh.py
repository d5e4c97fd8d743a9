"""LocalMesh and the commands built on it: `ragfleet up` (supervised mesh, clean Ctrl-C, dies loudly) and
`ragfleet demo` (the README's first command). The command tests run the real CLI as a subprocess."""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import demo, up
from services.cli import mesh
from services.cli.mesh import SERVICES, MeshError, free_port
from tests.unit.cli._up_output import Lines, banner_pids

pytestmark = pytest.mark.slow


def test_port_base_maps_to_the_runtime_defaults() -> None:
    assert up.pinned_ports(50050, up._PORT_OFFSETS) == {"embedding": 50051, "retrieval": 50052,
                                                        "generation": 50053, "gateway": 50050}
    assert up.pinned_ports(7000, up._METRICS_OFFSETS)["generation"] == 7003
    assert up.pinned_ports(0, up._PORT_OFFSETS) == {}


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_free_ports_lie_below_the_ephemeral_range_and_skip_ports_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # A port from bind(0) lies in the ephemeral range, where an outgoing connection can take it as its source port
    # before the service binds it: CI once saw "Address already in use" that way.
    low, _ = mesh._ephemeral_ports()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(mesh._LOW_PORT <= port < low for port in ports)
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[-1] + 1 if ports[-1] + 1 < low else mesh._LOW_PORT))
        held.listen(1)
        assert held.getsockname()[1] not in {free_port() for _ in range(3)}
    monkeypatch.setattr(mesh, "_ephemeral_ports", lambda: (mesh._LOW_PORT + 10, 60999))  # no room below: bind(0)
    assert free_port() >= mesh._LOW_PORT + 10


def test_a_taken_port_fails_before_anything_starts(tmp_path: Path) -> None:
    # An ephemeral port's neighbours can belong to other processes (CI once found base + 1 taken), so look for a
    # base whose other three ports are free at the moment of the check before holding base + 2.
    for _ in range(100):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        base = busy.getsockname()[1] - 2  # retrieval = base + 2 is taken
        if all(_free(base + offset) for offset in (0, 1, 3)):
            break
        busy.close()
    else:
        pytest.skip("no run of four loopback ports with only the held one taken")
    with busy:
        args = argparse.Namespace(port_base=base, metrics_port_base=None, host="127.0.0.1")
        with pytest.raises(MeshError, match=rf"port {base + 2} for retrieval is in use.*--port-base"):
            up.build_mesh(args, tmp_path)


def test_the_banner_is_written_at_once() -> None:
    """Whoever has read "Ctrl-C stops everything." may close the terminal at once: no part of the banner may still be
    unwritten then (print's separate end="\\n" was), or that write fails with EIO and `up` exits 141, as for a closed
    pipe, instead of stopping on the SIGHUP with 0."""

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    processes = {name: SimpleNamespace(metrics_port=9450 + i, process=SimpleNamespace(pid=100 + i))
                 for i, name in enumerate(SERVICES)}
    mesh = SimpleNamespace(address=lambda name: f"127.0.0.1:{50050 + SERVICES.index(name)}", processes=processes,
                           data_dir=Path("/data"))
    out = Writes()
    up.print_banner(mesh, 1.5, out)  # type: ignore[arg-type]
    assert [call for call in out.calls if call] == [out.getvalue()]
    assert out.getvalue().endswith("Ctrl-C stops everything.\n")


def test_demo_success_needs_an_answer_and_numbered_sources() -> None:
    good = "Bees dance [1].\n\nSources:\n  [1] Waggle (02.md)\n"
    assert demo.answered_with_sources(0, good)
    assert not demo.answered_with_sources(1, good)
    assert not demo.answered_with_sources(0, "\nSources:\n  [1] Waggle\n")  # no answer text
    assert not demo.answered_with_sources(0, "Bees dance.\n\n(no sources: the corpus is empty ...)\n")


def _start_up(data_dir: Path, log_level: str = "WARNING") -> tuple[subprocess.Popen, Lines, dict[str, int], str]:
    env = {**os.environ, "RAGFLEET_LOG_LEVEL": log_level, "RAGFLEET_REDIS_URL": "", "RAGFLEET_LLM_BASE_URL": ""}
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--port-base", "0", "--data-dir",
                                str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = Lines(process.stdout)
    try:
        banner = lines.wait_for("Ctrl-C stops everything.", timeout=120)
    except AssertionError:
        process.kill()
        raise
    pids = banner_pids(banner)
    gateway = re.search(r"^  gateway\s+(127\.0\.0\.1:\d+)", banner, re.M).group(1)
    assert sorted(pids) == sorted(SERVICES)
    return process, lines, pids, gateway


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_all(process: subprocess.Popen, pids: dict[str, int]) -> None:
    """After a failed test: `up` and the services it started (own sessions: killing `up` alone orphans them)."""
    if process.poll() is None:
        process.kill()
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_up_serves_until_ctrl_c_then_stops_every_service(tmp_path: Path, stop_signal: int) -> None:
    process, lines, pids, gateway = _start_up(tmp_path)
    try:
        with grpc.insecure_channel(gateway) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="ragfleet.v1.GatewayService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert (tmp_path / "logs" / "gateway.log").exists()
        process.send_signal(stop_signal)
        assert process.wait(30) == 0
        assert not [name for name, pid in pids.items() if _alive(pid)]
        assert "unclean exits" not in "".join(lines.seen) + process.stdout.read()
    finally:
        _kill_all(process, pids)


def test_up_exits_non_zero_with_the_log_tail_when_a_service_dies(tmp_path: Path) -> None:
    process, _, pids, _ = _start_up(tmp_path, log_level="INFO")
    try:
        os.kill(pids["retrieval"], signal.SIGKILL)
        assert process.wait(30) == 1
        stderr = process.stderr.read()
        assert "retrieval exited with code -9" in stderr
        assert "retrieval.log" in stderr and '"service": "retrieval"' in stderr  # the tail of its own log
        assert not [name for name, pid in pids.items() if _alive(pid)]
    finally:
        _kill_all(process, pids)


def test_demo_answers_the_sample_question_with_sources(tmp_path: Path) -> None:
    env = {**os.environ, "RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_REDIS_URL": "", "RAGFLEET_LLM_BASE_URL": "",
           "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "services.cli", "demo"], capture_output=True, text=True,
                            env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    answer, _, sources = result.stdout.partition("\nSources:\n")
    assert "ingested 10 documents" in answer
    assert re.search(r"waggle.*\[\d\]", answer.split("Q: ", 1)[1], re.S | re.I)
    assert "02-waggle-dance.md" in sources
    assert not list(tmp_path.glob("ragfleet-demo-*")), "the demo's temporary data dir must be removed"
