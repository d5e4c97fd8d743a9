"""Several worker processes on one port (services/runtime/workers.py) as real processes: generation with 2 workers
serves from both (per-worker counters in the multiprocess directory), one scrape shows both, SIGTERM drains both
and exits 0 with no orphan; a worker that dies takes the service down; a worker's start-up error is the service's;
the port says SERVING only once every worker has built; a SIGKILLed supervisor's metrics directory goes with the
next start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from services.cli.mesh import die_with_parent, free_port
from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.slow

REQUEST = generation_pb2.GenerateRequest(question="Which language is Qdrant written in?", passages=[
    common_pb2.Passage(number=1, title="Qdrant", text="Qdrant is a vector database written in Rust.", score=0.9)])
MAX_CONCURRENT = 64
CONNECTIONS = 40  # each on its own channel: the kernel hashes connections, so both workers get some


ROOT = Path(__file__).resolve().parents[2]


class Service:
    def __init__(self, name: str, log: Path, *, argv: list[str] | None = None, **env: str) -> None:
        self.port, self.metrics_port, self.log = free_port(), free_port(), log
        prefix = f"RAGFLEET_{name.upper()}_"
        environ = {**os.environ, "RAGFLEET_INTERNAL_AUTH": "off", "RAGFLEET_LOG_FORMAT": "text",
                   prefix + "PORT": str(self.port), prefix + "METRICS_PORT": str(self.metrics_port),
                   prefix + "HOST": "127.0.0.1", **env}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv or [sys.executable, "-m", f"services.{name}"],
                                            env={**environ, **die_with_parent()}, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def wait_serving(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            if "workers serving" in self.log.read_text():  # the supervisor's line, once every worker serves
                return
            time.sleep(0.2)
        raise AssertionError(f"not serving after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def generation(tmp_path: Path) -> Iterator[Service]:
    service = Service("generation", tmp_path / "generation.log", RAGFLEET_GENERATION_WORKERS="2",
                      RAGFLEET_GENERATION_MAX_CONCURRENT=str(MAX_CONCURRENT),
                      RAGFLEET_GENERATION_DRAIN_NOTICE_SECONDS="0.5")
    try:
        service.wait_serving()
        yield service
    finally:
        service.stop()


async def _generate_on_new_connections(address: str, count: int) -> None:
    async def one() -> None:
        # Its own subchannel pool: otherwise gRPC shares one connection between same-target channels.
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            replies = [r async for r in generation_pb2_grpc.GenerationServiceStub(channel).Generate(REQUEST, timeout=10)]
            assert replies[-1].HasField("finished")

    await asyncio.gather(*(one() for _ in range(count)))


def _metrics_directory(pid: int) -> Path:
    """The multiprocess directory the supervisor gave worker ``pid``."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return Path(next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")))


def _generates_by_worker(pids: list[int]) -> dict[int, float]:
    """Each worker's own Generate count, from its file in the multiprocess directory the supervisor gave it."""
    directory = _metrics_directory(pids[0])
    counts = {}
    for pid in pids:
        metrics = MultiProcessCollector.merge([f"{directory}/counter_{pid}.db"], accumulate=True)
        counts[pid] = sum(s.value for m in metrics for s in m.samples if s.name == "ragfleet_rpc_requests_total"
                          and s.labels.get("method", "").endswith("/Generate"))
    return counts


def _scrape(service: Service) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ragfleet_rpc_requests_total" and not sample.labels["method"].endswith("/Generate"):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def test_two_workers_share_the_port_one_scrape_and_drain_on_sigterm(generation: Service) -> None:
    pids = generation.workers()
    assert len(pids) == 2
    await _generate_on_new_connections(generation.address, CONNECTIONS)

    by_worker = _generates_by_worker(pids)
    assert sum(by_worker.values()) == CONNECTIONS and all(by_worker.values()), by_worker
    scraped = _scrape(generation)
    assert scraped["ragfleet_rpc_requests_total"] == CONNECTIONS  # both workers' counters, summed
    assert scraped["ragfleet_generation_admission_limit"] == 2 * MAX_CONCURRENT  # livesum over live workers
    assert scraped["process_cpu_seconds_total"] > 0

    async with grpc.aio.insecure_channel(generation.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=2)).status == \
            health_pb2.HealthCheckResponse.SERVING
    directory = _metrics_directory(pids[0])

    generation.process.send_signal(signal.SIGTERM)
    assert generation.process.wait(30) == 0
    log = generation.log.read_text()
    assert log.count(" draining") == 2 and log.count(" stopped") == 2, log
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "a worker outlived the supervisor"
    assert not directory.exists(), "the run's metrics directory is removed"


async def test_a_worker_that_dies_stops_the_service(generation: Service) -> None:
    dead, survivor = generation.workers()
    os.kill(dead, signal.SIGKILL)
    assert generation.process.wait(30) == 128 + signal.SIGKILL  # the dead worker's status, as a shell shows it
    assert " draining" in generation.log.read_text()  # the other one drained
    assert not Path(f"/proc/{survivor}").exists()


def test_a_worker_start_up_error_is_the_services(tmp_path: Path) -> None:
    service = Service("gateway", tmp_path / "gateway.log", RAGFLEET_GATEWAY_WORKERS="2", RAGFLEET_REDIS_URL="")
    try:
        assert service.process.wait(60) == 2
    finally:
        service.stop()
    last = service.log.read_text().strip().splitlines()[-1]
    assert last.startswith("gateway: configuration error: RAGFLEET_GATEWAY_WORKERS > 1 needs RAGFLEET_REDIS_URL")


def test_the_port_says_serving_only_once_every_worker_has_built(tmp_path: Path) -> None:
    """`ragfleet up` and readiness probes ask the port's health, which whichever worker takes the connection
    answers: with worker 1 slow to build, worker 0 must not say SERVING alone."""
    built = tmp_path / "built"
    built.mkdir()
    service = Service("generation", tmp_path / "generation.log",
                      argv=[sys.executable, "-c", "from tests.integration._slow_worker import run; run()"],
                      RAGFLEET_GENERATION_WORKERS="2", RAGFLEET_TEST_SLOW_BUILD_SECONDS="3",
                      RAGFLEET_TEST_BUILT_DIR=str(built))
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert service.process.poll() is None and time.monotonic() < deadline, service.log.read_text()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.05)
        assert sorted(p.name for p in built.iterdir()) == ["built-0", "built-1"], "SERVING before worker 1 built"
        assert len(service.workers()) == 2
    finally:
        service.stop()


def test_a_killed_supervisors_metrics_directory_goes_with_the_next_start(tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no chance to remove its run's metrics directory; the next supervisor to start
    removes it once the run's workers (which drain on the death signal) have exited."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    first = Service("generation", tmp_path / "first.log", RAGFLEET_GENERATION_WORKERS="2", TMPDIR=str(temp),
                    RAGFLEET_GENERATION_DRAIN_NOTICE_SECONDS="0.5")
    try:
        first.wait_serving()
        pids = first.workers()
        directory = _metrics_directory(pids[0])
        assert directory.parent == temp and directory.is_dir()
        first.process.kill()
        first.process.wait(10)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its killed supervisor"
            time.sleep(0.1)
        assert directory.is_dir()  # left behind
    finally:
        first.stop()
    second = Service("generation", tmp_path / "second.log", RAGFLEET_GENERATION_WORKERS="2", TMPDIR=str(temp))
    try:
        second.wait_serving()
        assert not directory.exists(), "the killed run's metrics directory is still there"
        assert _metrics_directory(second.workers()[0]).is_dir()  # the running one's is not touched
    finally:
        second.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
