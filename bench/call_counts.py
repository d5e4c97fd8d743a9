"""Python calls per uncached Ask in each service, tracing off vs on: where tracing's CPU goes when no profile shows it.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.call_counts            # off vs sampled, 200 Asks each

CPU time per span in a hot loop said tracing should cost a third of what bench/tracing_cost.py measured in the mesh,
and py-spy put ~2 % of a sampled service's samples in the SDK's frames: the cost is many small calls, each dearer in
a busy process than in a loop that keeps it in cache. Call counts are exact where sampled time is not. One mesh per
mode (bench/tracing_cost.py's settings) runs with cProfile in each service's main thread (bench/_call_counting), is
warmed up, counts from zero over --asks sequential uncached one-token Asks, and writes its counts; the report gives
calls per Ask per service and mode, and the functions whose calls grew most over "off". cProfile's own times are
inflated and not reported. Export is left out: it runs in the BatchSpanProcessor's own thread, which is not profiled
(bench/tracing_cost.py counts its CPU). Writes bench/results/call_counts.{json,md} (--name for another name).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import re
import signal
import sys
import tempfile
from pathlib import Path

import grpc

from bench._common import QUESTIONS, ROOT, ask_once, cost_mesh, write_results
from bench._sim import SimProcess
from bench.ask_cost import MESH, ONE_TOKEN_SIM, warm_up
from bench.tracing_cost import _env
from services.runtime.pb.ragfleet.v1 import gateway_pb2_grpc

SITE = Path(__file__).resolve().parent / "_call_counting"
TOP = 12  # functions listed per service
MODES = ("off", "sampled")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # "<built-in method __new__ of type object at 0x7f...>": one name per run


def _counts(path: Path) -> collections.Counter[str]:
    """Calls per function (file:line:name, site-packages and the tree's root cut off) in one written profile."""
    calls: collections.Counter[str] = collections.Counter()
    for (filename, line, name), (_, ncalls, *_rest) in pstats.Stats(str(path)).stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].split(f"{ROOT}/")[-1]
        calls[f"{short}:{line}({_ADDRESS.sub('', name)})"] += ncalls
    return calls


async def _count_mode(mode: str, sim: SimProcess, asks: int, out: Path) -> dict[str, collections.Counter[str]]:
    out.mkdir(parents=True, exist_ok=True)
    path = [str(SITE), os.environ.get("PYTHONPATH", ""), str(ROOT)]
    env = _env(mode, "") | {"BENCH_CALL_COUNTS_DIR": str(out), "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    with cost_mesh(sim.base_url, f"calls-{mode}", env) as mesh:
        pids = [mesh.processes[name].process.pid for name in MESH]
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            await warm_up(stub)
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            await asyncio.sleep(0.5)
            for i in range(asks):
                await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
            for pid in pids:
                os.kill(pid, signal.SIGUSR2)
            for _ in range(100):  # the profiles are written between two event-loop callbacks
                if all((out / f"{name}.prof").exists() for name in MESH):
                    break
                await asyncio.sleep(0.1)
    return {name: _counts(out / f"{name}.prof") for name in MESH}


async def run(args: argparse.Namespace) -> int:
    sim = SimProcess()
    sim.configure(ONE_TOKEN_SIM)
    try:
        with tempfile.TemporaryDirectory(prefix="call-counts-") as tmp:
            counts = {mode: await _count_mode(mode, sim, args.asks, Path(tmp) / mode) for mode in args.modes}
    finally:
        sim.stop()
    per_ask = {mode: {name: sum(c.values()) / args.asks for name, c in by_service.items()}
               for mode, by_service in counts.items()}
    base = args.modes[0]
    rows = [f"## Python calls per uncached Ask ({args.asks} Asks per mode, main thread of each service)", "",
            "| mode | " + " | ".join(MESH) + " | mesh | over " + base + " |", "|---" * (len(MESH) + 3) + "|"]
    for mode in args.modes:
        total = sum(per_ask[mode].values())
        rows.append(f"| {mode} | " + " | ".join(f"{per_ask[mode][n]:.0f}" for n in MESH)
                    + f" | {total:.0f} | {total - sum(per_ask[base].values()):+.0f} |")
    grown: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for mode in args.modes[1:]:
        grown[mode] = {}
        rows += ["", f"## The functions called most more often per Ask, {mode} over {base}", ""]
        for name in MESH:
            delta = counts[mode][name].copy()
            delta.subtract(counts[base][name])
            top = [(fn, n / args.asks) for fn, n in delta.most_common(TOP) if n > 0]
            grown[mode][name] = top
            rows.append(f"- {name}: " + "; ".join(f"{fn} +{n:.0f}" for fn, n in top))
    write_results(args.name, figures={"calls_per_ask": per_ask, "grown": grown, "asks": args.asks},
                  targets=[], markdown="\n".join(rows),
                  notes=["cProfile in each service's main thread; counts are exact, its times are not reported."])
    print("\n".join(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="tracing settings, as in bench/tracing_cost.py; the first is the one compared against")
    parser.add_argument("--asks", type=int, default=200, help="sequential uncached one-token Asks per mode")
    parser.add_argument("--name", default="call_counts", help="results name (bench/results/<name>.*)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
