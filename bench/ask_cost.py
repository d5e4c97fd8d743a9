"""CPU cost of one Ask, process by process, through the mesh: the budget behind the concurrent-stream targets.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.ask_cost

Same mesh, sim LLM and sample corpus as bench/gateway_bench.py (bypass_cache=True, so every Ask embeds, retrieves
and generates; the query embeddings are served by the embedding service's own cache, as there). Two phases:
  1. fixed cost per Ask: 200 sequential Asks answered with a single token (sim TTFT 0): CPU seconds of each process
     (/proc, user + system) per Ask;
  2. cost per streamed token: 100 concurrent streams against the load sim (TTFT 200 ms, 20 tokens/s, 100 tokens),
     below saturation; each process's CPU minus 100 x its fixed cost, per delta received by the client.
From the two it models the cores N concurrent streams need while they start over a ramp and then stream:
Asks/s x fixed cost + streams x 20 tokens/s x cost per token. The load generator (client) and the sim LLM are
counted separately: on a real deployment neither runs on the mesh's cores.
  3. the bare mesh floor, same run, after the mesh has stopped (bench/_bare_mesh.py measure_floor: four grpc.aio
     processes with an Ask's shapes doing no work; the same one-token sim for phase 1's shape and the same streams
     for phase 2's): issue 12's targets, mesh CPU per Ask outside model inference and the engine's search <= 2x the
     bare mesh's CPU per Ask, and mesh CPU per streamed token <= 1.5x the bare relay's. "Outside" subtracts what the
     services time inside themselves, from their /metrics histograms around phase 1: the embedding model's batches
     (ragfleet_embedding_model_seconds; phase 1's query embeddings are cache hits, so usually 0) and the engine's
     calls in retrieval (ragfleet_retrieval_stage_seconds: dense, sparse, fetch). Those are wall times: on an idle
     core, sequential Asks, about the CPU they took. --no-floor skips phase 3 (phases 1-2 alone, as before).
Writes bench/results/ask_cost.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench._bare_mesh import measure_floor
from bench._common import LOAD_SIM, QUESTIONS, ask_once, cost_mesh, target, write_results
from bench._sim import SimProcess, cpu_seconds
from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

MESH = ("embedding", "retrieval", "generation", "gateway")
ONE_TOKEN_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 1}
RAMP_SECONDS = 5.0  # as in gateway_bench: the streams start over 5 s
# Issue 12's goals against the bare mesh floor (phase 3), and what the services time inside themselves that the
# floor does not do: {service: (histogram, the label values of `stage` to count, or None for all)}.
FLOOR_CPU_PER_ASK_GOAL = 2.0
FLOOR_CPU_PER_TOKEN_GOAL = 1.5
TIMED_INSIDE = {"embedding": ("ragfleet_embedding_model_seconds", None),
                "retrieval": ("ragfleet_retrieval_stage_seconds", ("dense", "sparse", "fetch"))}


async def warm_up(stub: Any) -> None:
    for i in range(20):  # connections, caches, first-call paths
        await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)


def timed_inside(mesh: LocalMesh) -> dict[str, float]:
    """Seconds each service of TIMED_INSIDE has timed so far around model inference or the engine's search."""
    out = {}
    for name, (histogram, stages) in TIMED_INSIDE.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_ports[name]}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        out[name] = sum(sample.value for family in text_string_to_metric_families(text) if family.name == histogram
                        for sample in family.samples
                        if sample.name == histogram + "_sum" and (stages is None or sample.labels["stage"] in stages))
    return out


async def fixed_cost(stub: Any, pids: dict[str, int], n: int, *, warm: bool = True) -> dict[str, float]:
    if warm:
        await warm_up(stub)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for i in range(n):
        await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
    return {name: (cpu_seconds(pid) - before[name]) / n * 1000 for name, pid in pids.items()}


async def token_cost(stub: Any, pids: dict[str, int], streams: int, fixed_ms: dict[str, float]) -> dict[str, Any]:
    deltas = 0

    async def one(i: int) -> None:
        nonlocal deltas
        await asyncio.sleep(i * RAMP_SECONDS / streams)
        async for event in stub.Ask(gateway_pb2.AskRequest(question=QUESTIONS[i % len(QUESTIONS)], bypass_cache=True),
                                    timeout=60):
            if event.WhichOneof("event") == "delta":
                deltas += 1

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - wall
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    per_token = {name: max(0.0, used[name] - streams * fixed_ms[name] / 1000) / max(deltas, 1) * 1e6
                 for name in pids}
    return {"streams": streams, "deltas": deltas, "wall_seconds": wall,
            "cores": {name: used[name] / wall for name in pids}, "per_token_us": per_token}


def cores_needed(streams: int, fixed_ms: dict[str, float], per_token_us: dict[str, float],
                 names: tuple[str, ...]) -> float:
    """Cores while all `streams` are open and the last ones are still starting (the peak of a ramped run)."""
    asks_per_second = streams / RAMP_SECONDS
    tokens_per_second = streams * LOAD_SIM["tokens_per_second"]
    return sum(asks_per_second * fixed_ms[n] / 1000 + tokens_per_second * per_token_us[n] / 1e6 for n in names)


async def run(args: argparse.Namespace) -> int:
    sim = SimProcess()
    mesh = None
    try:
        # Every Ask bypasses the cache, so the corpus version the gateway reads (the runtime's shared key for
        # tenant "default", not per run; nothing here writes it: retrieval has no Redis) never decides anything.
        mesh = cost_mesh(sim.base_url, "cost")
        pids = {name: mesh.processes[name].process.pid for name in MESH}
        pids |= {"sim-llm": sim.process.pid, "load generator": os.getpid()}
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            sim.configure(ONE_TOKEN_SIM)
            print(f"phase 1: fixed cost ({args.asks} sequential one-token Asks)", flush=True)
            await warm_up(stub)
            inside_before = timed_inside(mesh)
            fixed = await fixed_cost(stub, pids, args.asks, warm=False)
            inside = {name: (seconds - inside_before[name]) / args.asks * 1000
                      for name, seconds in timed_inside(mesh).items()}
            sim.configure(LOAD_SIM)
            print(f"phase 2: cost per token ({args.streams} streams, {LOAD_SIM})", flush=True)
            tokens = await token_cost(stub, pids, args.streams, fixed)
    finally:
        if mesh is not None:
            mesh.stop()
        sim.stop()
    floor = None
    if args.floor:
        print(f"phase 3: the bare mesh floor ({args.asks} one-token Asks, {args.streams} streams)", flush=True)
        floor = await measure_floor(asks=args.asks, hops=20, streams=args.streams)

    per_token = tokens["per_token_us"]
    model = {n: {"mesh": cores_needed(n, fixed, per_token, MESH),
                 "with sim and load generator": cores_needed(n, fixed, per_token, tuple(pids))}
             for n in (100, 250, 500, 1000)}
    figures = {"fixed_ms_per_ask": fixed, "tokens": tokens, "model_cores": model,
               "ramp_seconds": RAMP_SECONDS, "load_sim": LOAD_SIM, "timed_inside_ms_per_ask": inside}
    rows = ["## CPU per Ask and per streamed token, by process", "",
            "| process | fixed ms per Ask | us per token | cores at 100 streams |", "|---|---|---|---|"]
    for name in pids:
        rows.append(f"| {name} | {fixed[name]:.2f} | {per_token[name]:.0f} | {tokens['cores'][name]:.2f} |")
    rows.append(f"| **mesh (4 services)** | {sum(fixed[n] for n in MESH):.2f} | "
                f"{sum(per_token[n] for n in MESH):.0f} | {sum(tokens['cores'][n] for n in MESH):.2f} |")
    rows += ["", f"Phase 2: {tokens['streams']} streams, {tokens['deltas']} deltas received, "
                 f"{tokens['wall_seconds']:.1f} s.", "",
             f"## Cores needed at the peak of a {RAMP_SECONDS:.0f} s ramp (streams/{RAMP_SECONDS:.0f} Asks/s x fixed "
             f"+ streams x {LOAD_SIM['tokens_per_second']:.0f} tokens/s x per token)", "",
             "| streams | mesh only | mesh + sim + load generator |", "|---|---|---|"]
    for n, m in model.items():
        rows.append(f"| {n} | {m['mesh']:.2f} | {m['with sim and load generator']:.2f} |")
    cores = os.cpu_count() or 1
    targets = [target("cores the mesh alone needs for 500 streams (model)", model[500]["mesh"],
                      f"<= {cores} (this machine)", model[500]["mesh"] <= cores)]
    if floor is not None:
        figures["floor"] = floor
        floor_rows, floor_targets = beside_floor(fixed, inside, per_token, floor)
        rows += ["", *floor_rows]
        targets += floor_targets
    notes = ["The mesh, the sim LLM and this load generator share the machine's cores; each process's CPU is read "
             "from /proc, so the split between them is exact even though they compete.",
             "Phase 1 tokens are one per Ask, so phase 1 is the work of an Ask without its answer: auth, cache lookup, "
             "embed, hybrid search with rerank, prompt assembly, the LLM request, the final event.",
             "The per-token figure is measured below saturation (100 streams), where gRPC and asyncio still batch "
             "wake-ups; a sequential single stream costs more per token."]
    if floor is not None:
        notes.append("Phase 3 (the bare mesh floor) runs after the mesh has stopped, with its own sim LLM; 'outside' "
                     "subtracts the wall time the services time around model batches and the engine's calls.")
    write_results(args.name, figures=figures, targets=targets, markdown="\n".join(rows), plot=plot(model),
                  notes=notes)
    print("\n".join(rows))
    return 0


def beside_floor(fixed: dict[str, float], inside: dict[str, float], per_token: dict[str, float],
                 floor: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Phase 3's table and issue 12's two CPU targets: the mesh against the bare mesh of the same run."""
    bare_ask, relay = floor["fixed"], floor["relay"]
    outside = {n: fixed[n] - inside.get(n, 0.0) for n in MESH}
    mesh_outside, bare_per_ask = sum(outside.values()), bare_ask["mesh_cpu_ms_per_ask"]
    mesh_token, bare_token = sum(per_token[n] for n in MESH), relay["mesh_us_per_token"]
    rows = ["## Beside the bare mesh floor (same run): CPU per Ask (ms) and per streamed token (us)", "",
            "| process | ms per Ask | timed inside (model, engine) | outside | bare floor ms per Ask | "
            "us per token | bare relay us per token |", "|---|---|---|---|---|---|---|"]
    for n in MESH:
        rows.append(f"| {n} | {fixed[n]:.2f} | {inside.get(n, 0.0):.2f} | {outside[n]:.2f} | "
                    f"{bare_ask['cpu_ms_per_ask'][n]:.2f} | {per_token[n]:.0f} | {relay['per_token_us'][n]:.0f} |")
    rows += [f"| **mesh (4 services)** | {sum(fixed[n] for n in MESH):.2f} | {sum(inside.values()):.2f} | "
             f"{mesh_outside:.2f} | {bare_per_ask:.2f} | {mesh_token:.0f} | {bare_token:.0f} |", "",
             f"Bare relay: {relay['streams']} streams x {relay['tokens_per_stream']} tokens, {relay['deltas']} deltas. "
             "'Timed inside' is the wall time the services time around model batches and the engine's calls."]
    # /proc counts CPU in clock ticks: a floor too short to register one must not crash the run's report.
    per_ask_ratio = mesh_outside / bare_per_ask if bare_per_ask > 0 else float("inf")
    token_ratio = mesh_token / bare_token if bare_token > 0 else float("inf")
    targets = [
        target("mesh CPU per Ask outside model inference and the engine's search / bare mesh CPU per Ask (x)",
               per_ask_ratio, f"<= {FLOOR_CPU_PER_ASK_GOAL:g}x", per_ask_ratio <= FLOOR_CPU_PER_ASK_GOAL)
        | {"floor": f"bare mesh {bare_per_ask:.2f} ms per Ask (mesh {mesh_outside:.2f} outside, "
                    f"{sum(fixed[n] for n in MESH):.2f} in all)"},
        target("mesh CPU per streamed token / bare relay CPU per token (x)", token_ratio,
               f"<= {FLOOR_CPU_PER_TOKEN_GOAL:g}x", token_ratio <= FLOOR_CPU_PER_TOKEN_GOAL)
        | {"floor": f"bare relay {bare_token:.0f} us per token (mesh {mesh_token:.0f})"}]
    return rows, targets


def plot(model: dict[int, dict[str, float]]):
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        streams = list(model)
        for key in ("mesh", "with sim and load generator"):
            ax.plot(streams, [model[n][key] for n in streams], marker="o", label=key)
        ax.axhline(os.cpu_count() or 1, color="grey", linestyle="--", label="cores on this machine")
        ax.set(xlabel="concurrent streams (20 tokens/s each)", ylabel="cores needed (model)",
               title="CPU budget of concurrent Ask streams")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)

    return draw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asks", type=int, default=200, help="sequential one-token Asks in phase 1")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams in phase 2 (below saturation)")
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip phase 3 (the bare mesh floor)")
    parser.add_argument("--name", default="ask_cost", help="results name (bench/results/<name>.*)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
