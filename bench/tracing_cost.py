"""CPU per Ask with tracing off, on without export, and on with every span exported over OTLP (issue 12 target).

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.tracing_cost

The mesh and load of bench/ask_cost.py phase 1 (sequential uncached one-token Asks, CPU of each service read from
/proc), one mesh per mode:
  off       OTEL_SDK_DISABLED=true: the SDK hands out no-op tracers (interceptors still run, nothing is recorded);
  sampled   OTEL_TRACES_SAMPLER=parentbased_always_on, every span recorded, no exporter configured (without it
            and without an exporter, services.runtime.telemetry records nothing since 2026-12-05);
  exported  the same, plus OTLP/gRPC export to a collector in this process (BatchSpanProcessor, as in production).
All meshes run at the same time and take the Asks in turn, --block Asks each, in an order rotated every round.
A mesh measured after another (the design until 2026-12-04) saw this machine's drift: two meshes of the same mode,
one after the other, differed by as much as tracing's whole cost (off 8.9-10.1 ms per Ask over 4 rounds). Blocks of
a few hundred milliseconds see the same machine, and a block long enough to warm the mesh's caches keeps the
interleaving from charging cold caches to every Ask.
Each mode runs on --replicas meshes (default 2), and its figure is their mean: two identical meshes live at once,
taking interleaved blocks, still differed by up to 5 % of CPU per Ask (2026-12-05: off 7.79 and 8.19 ms in one run,
the processes' own placement in memory and caches), a third of tracing's cost. The report gives each mesh's figure
and the spread between the replicas of each mode, so the noise is read beside the ratio.
The target: tracing on at 100 % sampling (exported) costs at most 15 % more mesh CPU per Ask than off, counted as
met only when the figure plus the run's noise (the widest gap between identical meshes of one mode) is within it.
Spans leave each process in batches (the SDK's OTEL_BSP_SCHEDULE_DELAY, 5 s, or 512 spans), so the CPU is read
--settle seconds past the last Ask: the export of the last spans is counted, not left outside.
Writes bench/results/tracing_cost.{json,md} (--name <name> writes <name>.* instead, for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from statistics import fmean
from typing import Iterable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench._common import QUESTIONS, ask_once, cost_mesh, target, write_results
from bench._sim import SimProcess, cpu_seconds
from bench.ask_cost import MESH, ONE_TOKEN_SIM, warm_up
from services.runtime.pb.ragfleet.v1 import gateway_pb2_grpc

MODES = ("off", "sampled", "exported")
Mesh = tuple[str, int]  # (mode, replica)
MAX_OVERHEAD = 0.15


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts what the services export and drops it."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def _env(mode: str, collector_address: str) -> dict[str, str]:
    if mode == "off":
        return {"OTEL_SDK_DISABLED": "true"}
    if mode == "exported":
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector_address}"}
    return {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}


def _order(round_: int) -> tuple[str, ...]:
    """The order of round `round_`: rotated each round, reversed every other three rounds, so six rounds run all
    six orders and no mode always goes first or follows the same one."""
    shift = round_ % len(MODES)
    order = MODES[shift:] + MODES[:shift]
    return order[::-1] if (round_ // len(MODES)) % 2 else order


def _replicas(meshes: Iterable[Mesh]) -> dict[str, list[Mesh]]:
    """Each mode's meshes, in replica order."""
    return {mode: sorted(mesh for mesh in meshes if mesh[0] == mode) for mode in MODES}


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each service of one mesh, read from /proc."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def measure(stubs: dict[Mesh, gateway_pb2_grpc.GatewayServiceStub], pids: dict[Mesh, dict[str, int]],
                  rounds: int, block: int,
                  settle: float) -> tuple[dict[Mesh, dict[str, float]], dict[Mesh, list[float]]]:
    """(CPU ms per Ask of each service per mesh over the whole run and the idle `settle` after it, each round's
    mesh CPU ms per Ask per mesh). The meshes are warmed first; each takes `block` sequential Asks per round: the
    modes in _order(round), each mode's replicas one after the other (in reverse every other round)."""
    for stub in stubs.values():
        await warm_up(stub)
    start = {mesh: _cpu(p) for mesh, p in pids.items()}
    by_round: dict[Mesh, list[float]] = {mesh: [] for mesh in pids}
    asked = 0
    replicas = _replicas(pids)
    for round_ in range(rounds):
        for mode in _order(round_):
            for mesh in (replicas[mode][::-1] if round_ % 2 else replicas[mode]):
                before = _cpu(pids[mesh])
                for i in range(block):
                    await ask_once(stubs[mesh], QUESTIONS[(asked + i) % len(QUESTIONS)], bypass_cache=True)
                after = _cpu(pids[mesh])
                by_round[mesh].append(sum(after[n] - before[n] for n in MESH) / block * 1000)
        asked += block
    await asyncio.sleep(settle)
    end = {mesh: _cpu(p) for mesh, p in pids.items()}
    per_ask = {mesh: {n: (end[mesh][n] - start[mesh][n]) / asked * 1000 for n in MESH} for mesh in pids}
    return per_ask, by_round


async def run(args: argparse.Namespace) -> int:
    sim = SimProcess()
    sim.configure(ONE_TOKEN_SIM)
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with contextlib.ExitStack() as meshes:
            started = {(mode, r): meshes.enter_context(cost_mesh(sim.base_url, f"tracing-{mode}-{r}",
                                                                 _env(mode, f"127.0.0.1:{port}")))
                       for r in range(args.replicas) for mode in MODES}
            channels = {key: grpc.aio.insecure_channel(mesh.address("gateway")) for key, mesh in started.items()}
            try:
                per_mesh, by_round = await measure(
                    {key: gateway_pb2_grpc.GatewayServiceStub(ch) for key, ch in channels.items()},
                    {key: {n: mesh.processes[n].process.pid for n in MESH} for key, mesh in started.items()},
                    args.rounds, args.block, args.settle)
            finally:
                for channel in channels.values():
                    await channel.close()
    finally:
        await server.stop(None)
        sim.stop()

    replicas = _replicas(per_mesh)
    per_ask = {mode: {n: fmean([per_mesh[key][n] for key in replicas[mode]]) for n in MESH} for mode in MODES}
    mesh_totals = {key: sum(per_mesh[key].values()) for key in per_mesh}
    totals = {mode: sum(per_ask[mode].values()) for mode in MODES}
    overhead = {mode: totals[mode] / totals["off"] - 1 for mode in MODES}
    # Replicas of one mode are identical: their spread is this run's noise between meshes, to read the ratio by.
    spread = {mode: max(mesh_totals[k] for k in replicas[mode]) / min(mesh_totals[k] for k in replicas[mode]) - 1
              for mode in MODES}
    # The same ratio over each third of the rounds: three estimates a few minutes apart (one block is too short
    # for /proc's 10 ms tick), to show how far the figure moves within the run.
    thirds = [range(i * args.rounds // 3, (i + 1) * args.rounds // 3) for i in range(3)]
    by_third = {mode: [fmean([sum(by_round[key][r] for r in part) / len(part) for key in replicas[mode]])
                       if part else 0.0 for part in thirds] for mode in MODES}
    # (nan where a smoke run's third was empty or too short for /proc to see any CPU)
    third_overhead = {mode: [on / off - 1 if off else float("nan") for on, off in zip(by_third[mode], by_third["off"])]
                      for mode in MODES}
    rows = [f"## Mesh CPU per uncached Ask (ms; {len(per_mesh)} meshes live at once, {args.replicas} per mode, Asks in "
            "interleaved blocks)", "",
            "| mode | " + " | ".join(MESH) + " | mesh | vs off | each replica's mesh | spread between replicas "
            "| vs off in each third of the rounds |",
            "|---" * (len(MESH) + 6) + "|"]
    for mode in MODES:
        rows.append(f"| {mode} | " + " | ".join(f"{per_ask[mode][n]:.2f}" for n in MESH) +
                    f" | {totals[mode]:.2f} | {overhead[mode]:+.1%} | "
                    + ", ".join(f"{mesh_totals[k]:.2f}" for k in replicas[mode]) + f" | {spread[mode]:.1%} | "
                    + ", ".join(f"{x:+.1%}" for x in third_overhead[mode]) + " |")
    rows += ["", f"{args.rounds} rounds x {args.block} Asks per mesh ({args.rounds * args.block} per mesh, "
                 f"{args.rounds * args.block * args.replicas} per mode); {collector.spans} spans exported in all."]
    # Met only when the figure clears the goal by more than this run's own noise, the widest gap between identical
    # meshes of one mode: on 2026-12-05 five runs of nearly the same code read +12.0 to +17.7 %, each with replicas
    # up to 5 % apart, so a single run a point or two under 15 % did not show the goal was met.
    noise = max(spread.values())
    targets = [target("tracing on (100 % sampled, exported over OTLP): extra mesh CPU per Ask vs off",
                      overhead["exported"], f"<= {MAX_OVERHEAD:.0%} with the run's noise ({noise:.1%}) added",
                      overhead["exported"] + noise <= MAX_OVERHEAD)]
    write_results(args.name, figures={"per_mode_ms": per_ask, "totals_ms": totals, "overhead": overhead,
                                      "per_mesh_ms": {f"{m}#{r}": v for (m, r), v in per_mesh.items()},
                                      "replica_spread": spread,
                                      "by_round_ms": {f"{m}#{r}": v for (m, r), v in by_round.items()},
                                      "third_overhead": third_overhead, "spans_exported": collector.spans},
                  targets=targets, markdown="\n".join(rows),
                  notes=["CPU of each service process from /proc (user + system) from the first measured Ask to "
                         f"{args.settle:g} idle seconds after the last, so the export of the last spans is counted; "
                         "each mesh idles while the others take their blocks (idle CPU is below /proc's 10 ms tick "
                         "over seconds). The sim LLM, the collector and this load generator are not counted.",
                         "Each third of the rounds runs every order of the modes; its ratio is read from the CPU "
                         "of its own blocks (the settle's export not included)."])
    print("\n".join(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=40, help="sequential one-token Asks per mode and round")
    parser.add_argument("--rounds", type=int, default=18, help="rounds (a multiple of 6 runs every order)")
    parser.add_argument("--replicas", type=int, default=2, help="meshes per mode (their mean is the mode's figure)")
    parser.add_argument("--settle", type=float, default=6.0,
                        help="idle seconds counted after the last Ask (past the 5 s export delay)")
    parser.add_argument("--name", default="tracing_cost", help="results name (bench/results/<name>.*)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
