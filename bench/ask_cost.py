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
Writes bench/results/ask_cost.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any


import grpc

from bench._common import LOAD_SIM, QUESTIONS, REDIS_URL, SAMPLE_CORPUS, ask_once, target, write_results
from bench._sim import SimProcess, cpu_seconds
from services.cli.ingest import ingest_path
from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

MESH = ("embedding", "retrieval", "generation", "gateway")
ONE_TOKEN_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 1}
RAMP_SECONDS = 5.0  # as in gateway_bench: the streams start over 5 s


async def fixed_cost(stub: Any, pids: dict[str, int], n: int) -> dict[str, float]:
    for i in range(20):  # warm-up: connections, caches, first-call paths
        await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
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
    prefix = f"ragfleet-bench:{uuid.uuid4().hex[:8]}:cost:"
    env = {"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm", "RAGFLEET_LOG_LEVEL": "WARNING",
           "RAGFLEET_GATEWAY_API_KEYS": "", "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix, "RAGFLEET_REDIS_URL": ""}
    # Every Ask bypasses the cache, so the corpus version the gateway reads (the runtime's shared key for tenant
    # "default", not per run; nothing here writes it: retrieval has no Redis) never decides anything.
    mesh = LocalMesh(data_dir=Path(tempfile.mkdtemp(prefix="ask-cost-")), env=env,
                     service_env={"gateway": {"RAGFLEET_REDIS_URL": REDIS_URL}})
    try:
        mesh.start()
        ingest_path(mesh.address("gateway"), str(SAMPLE_CORPUS), show_progress=False)
        pids = {name: mesh.processes[name].process.pid for name in MESH}
        pids |= {"sim-llm": sim.process.pid, "load generator": os.getpid()}
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            sim.configure(ONE_TOKEN_SIM)
            print(f"phase 1: fixed cost ({args.asks} sequential one-token Asks)", flush=True)
            fixed = await fixed_cost(stub, pids, args.asks)
            sim.configure(LOAD_SIM)
            print(f"phase 2: cost per token ({args.streams} streams, {LOAD_SIM})", flush=True)
            tokens = await token_cost(stub, pids, args.streams, fixed)
    finally:
        mesh.stop()
        sim.stop()

    per_token = tokens["per_token_us"]
    model = {n: {"mesh": cores_needed(n, fixed, per_token, MESH),
                 "with sim and load generator": cores_needed(n, fixed, per_token, tuple(pids))}
             for n in (100, 250, 500, 1000)}
    figures = {"fixed_ms_per_ask": fixed, "tokens": tokens, "model_cores": model,
               "ramp_seconds": RAMP_SECONDS, "load_sim": LOAD_SIM}
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
    notes = ["The mesh, the sim LLM and this load generator share the machine's cores; each process's CPU is read "
             "from /proc, so the split between them is exact even though they compete.",
             "Phase 1 tokens are one per Ask, so phase 1 is the work of an Ask without its answer: auth, cache lookup, "
             "embed, hybrid search with rerank, prompt assembly, the LLM request, the final event.",
             "The per-token figure is measured below saturation (100 streams), where gRPC and asyncio still batch "
             "wake-ups; a sequential single stream costs more per token."]
    write_results("ask_cost", figures=figures, targets=targets, markdown="\n".join(rows), plot=plot(model),
                  notes=notes)
    print("\n".join(rows))
    return 0


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
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
