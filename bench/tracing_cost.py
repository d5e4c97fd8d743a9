"""CPU per Ask with tracing off, on without export, and on with every span exported over OTLP (issue 12 target).

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.tracing_cost

The mesh and load of bench/ask_cost.py phase 1 (sequential uncached one-token Asks, CPU of each service read from
/proc), started once per mode and the modes interleaved over --rounds, so drift on a shared machine hits all alike:
  off       OTEL_SDK_DISABLED=true: the SDK hands out no-op tracers (interceptors still run, nothing is recorded);
  sampled   the default: parentbased_always_on, every span recorded, no exporter configured;
  exported  the same, plus OTLP/gRPC export to a collector in this process (BatchSpanProcessor, as in production).
The target: tracing on at 100 % sampling (exported) costs at most 15 % more mesh CPU per Ask than off.
Spans leave each process in batches (the SDK's OTEL_BSP_SCHEDULE_DELAY, 5 s, or 512 spans), so every mode's CPU
window runs on --settle seconds past its last Ask: the export of the last spans is counted, not left outside.
Writes bench/results/tracing_cost.{json,md} (--name <name> writes <name>.* instead, for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from statistics import median

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench._common import cost_mesh, target, write_results
from bench._sim import SimProcess, cpu_seconds
from bench._common import QUESTIONS, ask_once
from bench.ask_cost import MESH, ONE_TOKEN_SIM, warm_up
from services.runtime.pb.ragfleet.v1 import gateway_pb2_grpc

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


async def _cost_until_exported(stub: gateway_pb2_grpc.GatewayServiceStub, pids: dict[str, int], asks: int,
                               settle: float) -> dict[str, float]:
    """CPU ms per Ask of each service over `asks` uncached Asks and `settle` idle seconds after them."""
    await warm_up(stub)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for i in range(asks):
        await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
    await asyncio.sleep(settle)
    return {name: (cpu_seconds(pid) - before[name]) / asks * 1000 for name, pid in pids.items()}


async def _one_mode(mode: str, sim: SimProcess, collector_address: str, asks: int,
                    settle: float) -> dict[str, float]:
    env: dict[str, str] = {}
    if mode == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif mode == "exported":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{collector_address}"
    with cost_mesh(sim.base_url, "tracing", env) as mesh:
        pids = {name: mesh.processes[name].process.pid for name in MESH}
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            return await _cost_until_exported(gateway_pb2_grpc.GatewayServiceStub(channel), pids, asks, settle)


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
                samples[mode].append(await _one_mode(mode, sim, f"127.0.0.1:{port}", args.asks, args.settle))
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
    write_results(args.name, figures={"per_mode_ms": per_mode, "totals_ms": totals, "overhead": overhead,
                                           "samples": samples, "spans_exported": collector.spans},
                  targets=targets, markdown="\n".join(rows),
                  notes=["CPU of each service process from /proc (user + system) over the measured Asks and "
                         f"{args.settle:g} idle seconds after them (every mode alike), so the export of the last "
                         "spans is counted; the sim LLM, the collector and this load generator are not counted."])
    print("\n".join(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asks", type=int, default=200, help="sequential one-token Asks per mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=6.0,
                        help="idle seconds counted after each mode's last Ask (past the 5 s export delay)")
    parser.add_argument("--name", default="tracing_cost", help="results name (bench/results/<name>.*)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
