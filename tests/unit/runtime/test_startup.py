"""One start-up contract: every service reports a bad configuration and a failed start-up the same way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.serve import CONFIG_ERROR, STARTUP_FAILED, Service, Started

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("embedding", "retrieval", "generation", "gateway")


def run(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAGFLEET_")}
    full.update({"RAGFLEET_DATA_DIR": str(tmp_path), "RAGFLEET_INTERNAL_AUTH": "off", **env})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], status: int, prefix: str, *names: str) -> None:
    """Exit ``status``; stderr ends with one line ``prefix...`` naming ``names``, after a structured log line."""
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert not result.stdout and not any("Traceback" in line for line in lines if not line.startswith("{"))
    assert lines[-1].startswith(prefix) and all(name in lines[-1] for name in names), lines[-1]
    logged = [json.loads(line) for line in lines[:-1] if line.startswith("{")]
    assert any(entry["level"] == "ERROR" and entry.get("exit_status") == status for entry in logged), lines


@pytest.mark.parametrize("name", SERVICES)
def test_a_bad_variable_exits_2_naming_it(name: str, tmp_path: Path) -> None:
    var = f"RAGFLEET_{name.upper()}_PORT"
    result = run(["-m", f"services.{name}"], {var: "not-a-port"}, tmp_path)
    assert_one_line_failure(result, CONFIG_ERROR, f"{name}: configuration error: ", var)


def test_ragfleet_serve_reports_the_same_way(tmp_path: Path) -> None:
    result = run(["-m", "services.cli", "serve", "generation"], {"RAGFLEET_LOG_FORMAT": "yaml"}, tmp_path)
    assert_one_line_failure(result, CONFIG_ERROR, "generation: configuration error: ", "RAGFLEET_LOG_FORMAT")


def test_a_port_in_use_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(["-m", "services.gateway"], {"RAGFLEET_GATEWAY_HOST": "127.0.0.1",
                                                  "RAGFLEET_GATEWAY_PORT": str(port),
                                                  "RAGFLEET_GATEWAY_METRICS_PORT": "0"}, tmp_path)
    assert_one_line_failure(result, STARTUP_FAILED, "gateway: start-up failed: ", f"127.0.0.1:{port}")


def test_every_server_module_has_the_same_shape() -> None:
    import importlib
    import inspect

    for name in SERVICES:
        server = importlib.import_module(f"services.{name}.server")
        assert isinstance(server.SERVICE, Service) and server.SERVICE.name == name
        assert server.SERVICE.full_name == f"ragfleet.v1.{name.capitalize()}Service"
        assert inspect.iscoroutinefunction(server.build) and callable(server.request_limits)
        assert inspect.signature(server.build).return_annotation in (Started, "Started")
