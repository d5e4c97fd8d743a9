"""Two gateway workers against one, beside two bare grpc.aio processes against one (issue 12, item 5).

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.workers [--quick]

The real mesh runs (LocalMesh, offline answerer, the sample corpus, Redis for the gateway); the gateway is restarted
with RAGFLEET_GATEWAY_WORKERS=1 and 2. The floor is bench/_floor_server.py (a bare grpc.aio server, no interceptors,
no work, a cached Ask's 3-message stream), run as 1 and 2 processes on one port: gRPC sets SO_REUSEPORT on Linux by
default. Load: closed-loop clients in their own processes (``--client``), many concurrent Asks of one repeated
question (every Ask after the first per worker is a response-cache hit) over many connections, each on its own
subchannel so the kernel spreads them over the workers. The four variants are interleaved in ABBA order over rounds;
each reports throughput, p50/p95/p99 and the server processes' CPU. Target: the gateway's 2-over-1 throughput ratio
>= 0.9x the bare servers' ratio in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench._common import QUESTIONS, REDIS_URL, ROOT, SAMPLE_CORPUS, delete_keys, percentiles, target, write_results

GATEWAY = "gateway"
BARE = "bare"
VARIANTS = ((GATEWAY, 1), (GATEWAY, 2), (BARE, 1), (BARE, 2))
CLIENT_IMPORT_SECONDS = 1.0  # a client process's imports, before its own warm-up starts: the CPU window starts after


# -- the load generator (its own process) --------------------------------------------------------------------------

async def _client(address: str, seconds: float, warmup: float, concurrency: int, connections: int) -> dict[str, Any]:
    import grpc

    from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

    # A local subchannel pool per channel: otherwise gRPC shares one connection between same-target channels.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [gateway_pb2_grpc.GatewayServiceStub(c) for c in channels]
    request = gateway_pb2.AskRequest(question=QUESTIONS[0])
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + seconds

    async def loop(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while (now := time.perf_counter()) < end:
            try:
                async for _ in stub.Ask(request, timeout=30):
                    pass
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            if now >= measure_from:
                latencies.append((time.perf_counter() - now) * 1000)

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    for channel in channels:
        await channel.close()
    return {"asks": len(latencies), "seconds": seconds, "latency_ms": latencies, "errors": errors}


def client_main(args: argparse.Namespace) -> int:
    import uvloop

    result = uvloop.run(_client(args.client, args.seconds, args.warmup, args.concurrency, args.connections))
    Path(args.out).write_text(json.dumps(result))  # a file, not stdout: nothing else can write into it
    return 0


# -- servers -------------------------------------------------------------------------------------------------------

def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _family(pid: int) -> list[int]:
    """A process and its children (a supervisor's workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (v4 and v6): how many processes of a SO_REUSEPORT group accept."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def _wait_listening(port: int, processes: int, timeout: float = 120.0) -> None:
    """Until every process listens: a client connecting earlier would stay on the first one for the whole run."""
    deadline = time.monotonic() + timeout
    while _listeners(port) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{processes} listeners on port {port} not up after {timeout:.0f}s")
        time.sleep(0.1)


class Bare:
    """``processes`` bare floor servers on one port."""

    def __init__(self, port: int, processes: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.procs = [subprocess.Popen([sys.executable, "-m", "bench._floor_server", str(port)], cwd=ROOT)
                      for _ in range(processes)]
        _wait_listening(port, processes)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


class Gateway:
    """The mesh, its gateway restarted with the asked number of workers."""

    def __init__(self, workdir: Path, prefix: str) -> None:
        from services.cli.mesh import LocalMesh

        env = {"RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_GATEWAY_API_KEYS": "", "RAGFLEET_REDIS_URL": "",
               "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix}
        self.mesh = LocalMesh(data_dir=workdir / "mesh", env=env,
                              service_env={"gateway": {"RAGFLEET_REDIS_URL": REDIS_URL}})

    def start(self) -> None:
        from services.cli.ingest import ingest_path

        self.mesh.start()
        ingest_path(self.mesh.address(GATEWAY), str(SAMPLE_CORPUS), show_progress=False)

    def use(self, workers: int) -> str:
        proc = self.mesh.processes[GATEWAY]
        if self.mesh.service_env[GATEWAY].get("RAGFLEET_GATEWAY_WORKERS") != str(workers):
            proc.process.send_signal(signal.SIGTERM)  # drain, so the port is free for the new supervisor
            proc.process.wait(60)
            self.mesh.service_env[GATEWAY]["RAGFLEET_GATEWAY_WORKERS"] = str(workers)
            self.mesh.restart(GATEWAY)
            _wait_listening(self.mesh.ports[GATEWAY], workers)
        return self.mesh.address(GATEWAY)

    def pids(self) -> list[int]:
        return _family(self.mesh.processes[GATEWAY].process.pid)

    def stop(self) -> None:
        self.mesh.stop()


def measure(address: str, pids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Run the client processes against ``address``; throughput, latency and the servers' CPU per Ask."""
    per_client = max(1, args.concurrency // args.clients)
    command = [sys.executable, "-m", "bench.workers", "--client", address, "--seconds", str(args.seconds),
               "--warmup", str(args.warmup), "--concurrency", str(per_client),
               "--connections", str(max(1, args.connections // args.clients))]
    outs = [Path(tempfile.mkstemp(prefix="workers-client-", suffix=".json")[1]) for _ in range(args.clients)]
    clients = [subprocess.Popen([*command, "--out", str(out)], cwd=ROOT) for out in outs]
    time.sleep(args.warmup + CLIENT_IMPORT_SECONDS)
    cpu_before, wall_before = _cpu_seconds(pids), time.perf_counter()
    client_cpu_before = _cpu_seconds([c.pid for c in clients])
    time.sleep(args.seconds)
    cpu, wall = _cpu_seconds(pids) - cpu_before, time.perf_counter() - wall_before
    client_cpu = _cpu_seconds([c.pid for c in clients]) - client_cpu_before
    for client in clients:
        if client.wait(args.seconds + 60) != 0:
            raise RuntimeError(f"a load-generator process failed with status {client.returncode}")
    results = [json.loads(out.read_text()) for out in outs]
    for out in outs:
        out.unlink()
    latencies = [ms for r in results for ms in r["latency_ms"]]
    asks = len(latencies)
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {"asks_per_second": asks / args.seconds, "latency_ms": percentiles(latencies), "errors": errors,
            "server_cores": cpu / wall, "server_cpu_us_per_ask": cpu / asks * 1e6 if asks else None,
            "client_cores": client_cpu / wall}


# -- the run -------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from services.cli.mesh import free_port

    prefix = f"ragfleet-bench:{uuid.uuid4().hex[:8]}:workers:"
    gateway = Gateway(Path(tempfile.mkdtemp(prefix="workers-bench-")), prefix)
    runs: dict[str, list[dict[str, Any]]] = {f"{kind}{n}": [] for kind, n in VARIANTS}
    load_before = os.getloadavg()
    try:
        gateway.start()
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))  # ABBA: drift cancels out
            for kind, n in order:
                if kind == GATEWAY:
                    address, pids = gateway.use(n), gateway.pids()
                    figures = measure(address, pids, args)
                else:
                    bare = Bare(free_port(), n)
                    try:
                        figures = measure(bare.address, bare.pids(), args)
                    finally:
                        bare.stop()
                runs[f"{kind}{n}"].append(figures)
                print(f"round {round_ + 1} {kind} x{n}: {figures['asks_per_second']:.0f} Asks/s, p50 "
                      f"{figures['latency_ms']['p50']:.2f} ms, server {figures['server_cores']:.2f} cores, "
                      f"clients {figures['client_cores']:.2f} cores, errors {figures['errors']}", flush=True)
    finally:
        gateway.stop()
        delete_keys(prefix + "*", url=REDIS_URL)
    summary = {name: {"asks_per_second": statistics.median(r["asks_per_second"] for r in rs),
                      "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in rs),
                      "p95_ms": statistics.median(r["latency_ms"]["p95"] for r in rs),
                      "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in rs),
                      "server_cores": statistics.median(r["server_cores"] for r in rs),
                      "server_cpu_us_per_ask": statistics.median(r["server_cpu_us_per_ask"] or 0 for r in rs),
                      "client_cores": statistics.median(r["client_cores"] for r in rs),
                      "errors": sum(sum(r["errors"].values()) for r in rs)} for name, rs in runs.items()}
    gateway_ratio = summary["gateway2"]["asks_per_second"] / summary["gateway1"]["asks_per_second"]
    bare_ratio = summary["bare2"]["asks_per_second"] / summary["bare1"]["asks_per_second"]
    # The same ratios within each round (its two runs adjacent in time), less exposed to the machine's drift.
    paired = {kind: statistics.median(two["asks_per_second"] / one["asks_per_second"]
                                      for one, two in zip(runs[f"{kind}1"], runs[f"{kind}2"]))
              for kind in (GATEWAY, BARE)}
    targets = [target("gateway 2-over-1 workers cached-Ask throughput ratio / bare grpc.aio 2-over-1 ratio",
                      gateway_ratio / bare_ratio, ">= 0.9", gateway_ratio >= 0.9 * bare_ratio)]
    rows = ["| variant | Asks/s | p50 ms | p95 ms | p99 ms | server cores | server CPU us/Ask | client cores | errors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        rows.append(f"| {name} | {s['asks_per_second']:.0f} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | "
                    f"{s['p99_ms']:.2f} | {s['server_cores']:.2f} | {s['server_cpu_us_per_ask']:.0f} | "
                    f"{s['client_cores']:.2f} | {s['errors']} |")
    markdown = "\n".join([*rows, "", f"Gateway 2/1 = {gateway_ratio:.3f}; bare 2/1 = {bare_ratio:.3f} "
                          f"(medians over {args.rounds} interleaved rounds of {args.seconds:g} s). Paired within "
                          f"rounds: gateway {paired[GATEWAY]:.3f}, bare {paired[BARE]:.3f}. Load average before "
                          f"and after: {load_before[0]:.2f}, {os.getloadavg()[0]:.2f}."])
    notes = [f"All processes share this machine's {os.cpu_count()} cores: the clients ({args.clients} processes, "
             f"{args.concurrency} concurrent Asks over {args.connections} connections in all), the servers and, for "
             "the gateway, the idle rest of the mesh. A second worker can only use what the clients leave.",
             "Gateway: RAGFLEET_GATEWAY_WORKERS=1 or 2, Redis on, offline answerer, one repeated question (a response "
             "cache hit after each worker's first Ask). Bare: bench/_floor_server.py, 1 or 2 processes on one port.",
             "Server cores and CPU per Ask: /proc utime+stime of the server processes (supervisor and workers) "
             "during the measured window."]
    write_results("workers_quick" if args.quick else "workers", figures={"runs": runs, "summary": summary,
                  "gateway_ratio": gateway_ratio, "bare_ratio": bare_ratio, "paired_ratios": paired,
                  "load_average_before_after": [load_before, os.getloadavg()]}, targets=targets, markdown=markdown,
                  notes=notes)
    print(markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)  # one load-generator process
    parser.add_argument("--out", help=argparse.SUPPRESS)  # where it writes its results
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 s")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per variant and round")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent Asks, over all clients")
    parser.add_argument("--connections", type=int, default=16, help="connections, over all clients")
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)
    if args.quick:
        args.rounds, args.seconds = 2, 4.0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
