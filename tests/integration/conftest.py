"""Session-scoped real meshes for integration tests: service processes on free loopback ports (LocalMesh).

- ``sim_llm``: the simulated OpenAI-compatible server as its own process, with live control (stats/config/reset).
- ``llm_mesh``: all four services, generation on the sim LLM (no fallback), Redis, API keys for two tenants,
  a small in-flight limit (``LLM_MESH_MAX_IN_FLIGHT``).
- ``offline_mesh``: all four services on embedded defaults (offline extractive answerer, no Redis, auth off:
  tenant "default"), exactly what `ragfleet up` runs.

Each mesh starts once per session, on first use. Tests that change the sim's settings restore them (``sim_settings``).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from services.cli.mesh import LocalMesh, free_port
from services.cli.sim_llm import SimLLMProcess
from tests.conftest import REDIS_URL

LLM_MESH_MAX_IN_FLIGHT = 6
SIM_DEFAULTS = {"ttft_ms": 30.0, "tokens_per_second": 400.0, "max_tokens": 24, "failure_rate": 0.0, "hang_rate": 0.0}


class SimLLM(SimLLMProcess):
    """Control handle of a sim-llm process, with a poll the tests assert on."""

    def wait_for(self, predicate, timeout: float = 5.0) -> dict[str, Any]:
        """Poll stats until predicate(stats) holds; returns the last stats (the caller asserts)."""
        deadline = time.monotonic() + timeout
        stats = self.stats()
        while not predicate(stats) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = self.stats()
        return stats


def start_sim_llm(**settings: Any) -> SimLLM:
    return SimLLM(**settings)


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def sim_llm() -> Iterator[SimLLM]:
    sim = start_sim_llm(**SIM_DEFAULTS)
    yield sim
    stop_process(sim.process)


@pytest.fixture
def sim_settings(sim_llm: SimLLM) -> Iterator[SimLLM]:
    """The sim, restored to the session defaults after the test (tests change latency and faults)."""
    yield sim_llm
    sim_llm.configure(**SIM_DEFAULTS)


@dataclass
class Tenants:
    key_a: str
    tenant_a: str
    key_b: str
    tenant_b: str


@dataclass
class MeshInfo:
    mesh: LocalMesh
    gateway: str
    env: dict[str, str]
    tenants: Tenants | None = None

    def address(self, name: str) -> str:
        return self.mesh.address(name)


def _cleanup_redis(prefix: str, tenants: list[str]) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        patterns = [prefix + "*"] + [f"ragfleet:retrieval:*{t}*" for t in tenants]
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def llm_mesh(tmp_path_factory: pytest.TempPathFactory, sim_llm: SimLLM) -> Iterator[MeshInfo]:
    run = uuid.uuid4().hex[:8]
    tenants = Tenants(f"key-a-{run}", f"tenant-a-{run}", f"key-b-{run}", f"tenant-b-{run}")
    prefix = f"ragfleet-test:{run}:gw:"
    env = {
        "RAGFLEET_LLM_BASE_URL": sim_llm.base_url,
        "RAGFLEET_LLM_MODEL": "sim-llm",
        "RAGFLEET_REDIS_URL": REDIS_URL,
        "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix,
        "RAGFLEET_GATEWAY_API_KEYS": f"{tenants.key_a}={tenants.tenant_a},{tenants.key_b}={tenants.tenant_b}",
        "RAGFLEET_GATEWAY_MAX_IN_FLIGHT": str(LLM_MESH_MAX_IN_FLIGHT),
        "RAGFLEET_GENERATION_FALLBACK": "false",
        "RAGFLEET_GENERATION_MAX_RETRIES": "0",
        "RAGFLEET_LOG_LEVEL": "WARNING",
    }
    data_dir = tmp_path_factory.mktemp("llm-mesh")
    mesh = LocalMesh(data_dir=data_dir, env=env)
    mesh.start()
    try:
        yield MeshInfo(mesh, mesh.address("gateway"), env, tenants)
    finally:
        mesh.stop()
        _cleanup_redis(prefix, [tenants.tenant_a, tenants.tenant_b])


@pytest.fixture(scope="session")
def offline_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshInfo]:
    env = {name: "" for name in ("RAGFLEET_LLM_BASE_URL", "RAGFLEET_REDIS_URL", "RAGFLEET_GATEWAY_API_KEYS")}
    env["RAGFLEET_LOG_LEVEL"] = "WARNING"
    mesh = LocalMesh(data_dir=tmp_path_factory.mktemp("offline-mesh"), env=env)
    mesh.start()
    try:
        yield MeshInfo(mesh, mesh.address("gateway"), env)
    finally:
        mesh.stop()


def extra_mesh(base: MeshInfo, data_dir: Path, names: list[str], *, env: dict[str, str] | None = None,
               gateway_env: dict[str, str] | None = None) -> LocalMesh:
    """More processes wired to `base`'s services (a second gateway replica, a differently configured
    generation, a gateway with a dead upstream). Upstreams not started here point at `base`; both meshes share
    `base`'s service tokens, so they accept each other's calls."""
    gateway = {f"RAGFLEET_GATEWAY_{n.upper()}_ADDRESS": base.address(n)
               for n in ("embedding", "retrieval", "generation") if n not in names}
    gateway.update(gateway_env or {})
    mesh = LocalMesh(data_dir=data_dir, env={**base.env, **(env or {})}, service_env={"gateway": gateway},
                     credentials=base.mesh.credentials)
    return mesh.start(names)


def dead_address() -> str:
    """A loopback port nothing listens on."""
    return f"127.0.0.1:{free_port()}"

