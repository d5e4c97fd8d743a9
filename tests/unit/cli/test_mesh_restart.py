"""LocalMesh.restart: a killed service comes back on the same ports, environment and data dir."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.mesh import LocalMesh

pytestmark = pytest.mark.slow


def test_restart_brings_a_killed_service_back_on_its_ports(tmp_path: Path) -> None:
    with LocalMesh(data_dir=tmp_path, env={"RAGFLEET_LOG_LEVEL": "INFO"}) as mesh:
        first = mesh.start(["generation"]).processes["generation"]
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        again = mesh.restart("generation", timeout=60)
        assert again.process.pid != first.process.pid and again.process.poll() is None
        assert (again.port, again.metrics_port, again.log_path) == (first.port, first.metrics_port, first.log_path)
        with grpc.insecure_channel(mesh.address("generation")) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        running = mesh.restart("generation", timeout=60)  # a running process is killed first, not left behind
        assert again.process.poll() is not None and running.process.poll() is None
