"""CPU per Ask with tracing off, on without export, and on with every span exported over OTLP (issue 12 target).

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.tracing_cost

The mesh and load of bench/ask_cost.py phase 1 (sequential uncached one-token Asks, CPU of each service read from
/proc), started once per mode and the modes interleaved over --rounds, so drift on a shared machine hits all alike:
  off       OTEL_SDK_DISABLED=true: the SDK hands out no-op tracers (interceptors still run, nothing is recorded);
  sampled   the default: parentbased_always_on, every span recorded, no exporter configured;
  exported  the same, plus OTLP/gRPC export to a collector in this process (BatchSpanProcessor, as in production).
The target: tracing on at 100 % sampling (exported) costs at most 15 % more mesh CPU per Ask than off.
Writes bench/results/tracing_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from statistics import median

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench._common import QUESTIONS, REDIS_URL, SAMPLE_CORPUS, ask_once, target, write_results
from bench._sim import SimProcess, cpu_seconds
from services.cli.ingest import ingest_path
from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2_grpc

MESH = ("embedding", "retrieval", "generation", "gateway")
ONE_TOKEN_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 1}
MODES = ("off", "sampled", "exported")
MAX_OVERHEAD = 0.15


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts what the services export and drops it."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def _one_mode(mode: str, sim: SimProcess, collector_address: str, asks: int) -> dict[str, float]:
    prefix = f"ragfleet-bench:{uuid.uuid4().hex[:8]}:tracing:"
    env = {"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm", "RAGFLEET_LOG_LEVEL": "WARNING",
           "RAGFLEET_GATEWAY_API_KEYS": "", "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix, "RAGFLEET_REDIS_URL": ""}
    if mode == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif mode == "exported":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{collector_address}"
    mesh = LocalMesh(data_dir=Path(tempfile.mkdtemp(prefix="tracing-cost-")), env=env,
                     service_env={"gateway": {"RAGFLEET_REDIS_URL": REDIS_URL}})
    try:
        mesh.start()
        ingest_path(mesh.address("gateway"), str(SAMPLE_CORPUS), show_progress=False)
        pids = {name: mesh.processes[name].process.pid for name in MESH}
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for i in range(20):
                await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            for i in range(asks):
                await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
            return {name: (cpu_seconds(pid) - before[name]) / asks * 1000 for name, pid in pids.items()}
    finally:
        mesh.stop()


async def run(args: argparse.Namespace) -> int:
    sim = SimProcess()
    sim.configure(ONE_TOKEN_SIM)
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else reversed(MODES):
                samples[mode].append(await _one_mode(mode, sim, f"127.0.0.1:{port}", args.asks))
                print(f"round {round_ + 1} {mode}: {sum(samples[mode][-1].values()):.2f} ms per Ask", flush=True)
    finally:
        await server.stop(None)
        sim.stop()

    per_mode = {mode: {name: median(s[name] for s in samples[mode]) for name in MESH} for mode in MODES}
    totals = {mode: sum(per_mode[mode].values()) for mode in MODES}
    overhead = {mode: totals[mode] / totals["off"] - 1 for mode in MODES}
    rows = ["## Mesh CPU per uncached Ask (ms, median over rounds)", "",
            "| mode | " + " | ".join(MESH) + " | mesh | vs off |", "|---" * (len(MESH) + 3) + "|"]
    for mode in MODES:
        rows.append(f"| {mode} | " + " | ".join(f"{per_mode[mode][n]:.2f}" for n in MESH) +
                    f" | {totals[mode]:.2f} | {overhead[mode]:+.1%} |")
    rows += ["", f"{args.rounds} rounds x {args.asks} Asks per mode; {collector.spans} spans exported in all."]
    targets = [target("tracing on (100 % sampled, exported over OTLP): extra mesh CPU per Ask vs off",
                      overhead["exported"], f"<= {MAX_OVERHEAD:.0%}", overhead["exported"] <= MAX_OVERHEAD)]
    write_results("tracing_cost", figures={"per_mode_ms": per_mode, "totals_ms": totals, "overhead": overhead,
                                           "samples": samples, "spans_exported": collector.spans},
                  targets=targets, markdown="\n".join(rows),
                  notes=["CPU of each service process from /proc (user + system) over the measured Asks; the sim "
                         "LLM, the collector and this load generator are not counted."])
    print("\n".join(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asks", type=int, default=200, help="sequential one-token Asks per mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
