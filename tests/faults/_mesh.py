"""The mesh the fault suite breaks: real service processes on loopback with proxies the tests control in between.

    sim-llm <- generation    <- gateway      (fallback off: the documented UNAVAILABLE)
            <- generation_fb <- gateway_fb   (RAGFLEET_GENERATION_FALLBACK=true: the extractive answer)
    both gateways -> [embedding proxy] -> embedding,  [retrieval proxy] -> retrieval
    every service -> [Redis proxy] -> Redis on 127.0.0.1:6379

Both gateways and both generations share one data dir and the first mesh's service-to-service tokens. Budgets
are short so a fault shows within seconds: first token 1 s, one retry, embed and retrieve stages 1 s each.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from services.cli.mesh import SERVICES, LocalMesh, free_port
from tests._redis import delete_keys
from tests.conftest import REDIS_URL
from tests.faults._proxy import TcpProxy
from tests.integration.conftest import SimLLM, start_sim_llm, stop_process

SIM_DEFAULTS: dict[str, Any] = {
    "ttft_ms": 20.0, "tokens_per_second": 400.0, "max_tokens": 16, "failure_rate": 0.0, "hang_rate": 0.0,
    "rate_limit_rate": 0.0, "retry_after_seconds": 1.0, "break_after_tokens": 0, "reset_after_tokens": -1,
    "malformed_after_tokens": -1}
FIRST_TOKEN_TIMEOUT = 1.0
STAGE_BUDGET = 1.0  # embed and retrieve
MAX_RETRIES = 1


@dataclass
class FaultMesh:
    mesh: LocalMesh  # embedding, retrieval, generation, gateway
    fallback: LocalMesh  # generation + gateway with fallback on
    sim: SimLLM
    redis: TcpProxy
    retrieval: TcpProxy
    embedding: TcpProxy
    key: str
    tenant: str
    gateway_prefix: str
    embedding_prefix: str
    proxies: list[TcpProxy] = field(default_factory=list)

    def gateway(self, fallback: bool = False) -> str:
        return (self.fallback if fallback else self.mesh).address("gateway")

    def generation_pid(self, fallback: bool = False) -> int:
        return (self.fallback if fallback else self.mesh).processes["generation"].process.pid

    @property
    def sim_port(self) -> int:
        return int(self.sim.base_url.rsplit(":", 1)[1].split("/")[0])

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key}")]

    def redis_keys(self, prefix: str) -> int:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            return sum(1 for _ in client.scan_iter(match=prefix + "*", count=1000))
        finally:
            client.close()

    def stop(self) -> None:
        try:
            for mesh in (self.fallback, self.mesh):
                mesh.stop(timeout=10)
        finally:
            stop_process(self.sim.process)
            for proxy in self.proxies:
                proxy.close()
            _cleanup_redis([self.gateway_prefix, self.embedding_prefix, f"ragfleet:retrieval:*{self.tenant}*"])


def _cleanup_redis(patterns: list[str]) -> None:
    delete_keys(*(pattern if "*" in pattern else pattern + "*" for pattern in patterns))


def start_fault_mesh(data_dir: Path) -> FaultMesh:
    """Start the sim, the proxies and both meshes; everything started is stopped again if any part fails."""
    run = uuid.uuid4().hex[:8]
    sim = start_sim_llm(**SIM_DEFAULTS)
    proxies: list[TcpProxy] = []
    meshes: list[LocalMesh] = []
    try:
        ports = {name: free_port() for name in SERVICES}
        redis_port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
        redis_proxy, retrieval_proxy, embedding_proxy = (
            TcpProxy(redis_port).start(), TcpProxy(ports["retrieval"]).start(), TcpProxy(ports["embedding"]).start())
        proxies += [redis_proxy, retrieval_proxy, embedding_proxy]
        key, tenant = f"fault-key-{run}", f"fault-tenant-{run}"
        gateway_prefix, embedding_prefix = f"ragfleet-test:{run}:gw:", f"ragfleet-test:{run}:emb:"
        env = {
            "RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm",
            "RAGFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/0",
            "RAGFLEET_GATEWAY_REDIS_PREFIX": gateway_prefix, "RAGFLEET_EMBEDDING_L2_PREFIX": embedding_prefix,
            "RAGFLEET_GATEWAY_API_KEYS": f"{key}={tenant}",
            "RAGFLEET_GATEWAY_EMBED_TIMEOUT_SECONDS": str(STAGE_BUDGET),
            "RAGFLEET_GATEWAY_RETRIEVE_TIMEOUT_SECONDS": str(STAGE_BUDGET),
            "RAGFLEET_GENERATION_FALLBACK": "false",
            "RAGFLEET_GENERATION_MAX_RETRIES": str(MAX_RETRIES),
            "RAGFLEET_GENERATION_RETRY_BACKOFF_SECONDS": "0.05",
            "RAGFLEET_GENERATION_FIRST_TOKEN_TIMEOUT_SECONDS": str(FIRST_TOKEN_TIMEOUT),
            "RAGFLEET_GENERATION_READ_TIMEOUT_SECONDS": "2.0",
            "RAGFLEET_LOG_LEVEL": "WARNING",
        }
        for name in SERVICES:
            env[f"RAGFLEET_{name.upper()}_DRAIN_NOTICE_SECONDS"] = "0.2"
            env[f"RAGFLEET_{name.upper()}_GRACE_SECONDS"] = "2"
        via_proxies = {"RAGFLEET_GATEWAY_RETRIEVAL_ADDRESS": retrieval_proxy.address,
                       "RAGFLEET_GATEWAY_EMBEDDING_ADDRESS": embedding_proxy.address}
        mesh = LocalMesh(data_dir=data_dir, env=env, ports=ports, service_env={"gateway": via_proxies})
        meshes.append(mesh)
        mesh.start()
        # The second gateway and generation present (and accept) the first mesh's service tokens.
        shared = {"credentials": mesh.credentials} if hasattr(mesh, "credentials") else {}
        fallback = LocalMesh(data_dir=data_dir, log_dir=data_dir / "logs-fallback",
                             env={**env, "RAGFLEET_GENERATION_FALLBACK": "true"}, service_env={"gateway": via_proxies},
                             **shared)
        meshes.append(fallback)
        fallback.start(["generation", "gateway"])
        return FaultMesh(mesh, fallback, sim, redis_proxy, retrieval_proxy, embedding_proxy, key, tenant,
                         gateway_prefix, embedding_prefix, proxies)
    except BaseException:
        for mesh in reversed(meshes):
            mesh.stop(timeout=5)
        stop_process(sim.process)
        for proxy in proxies:
            proxy.close()
        raise
