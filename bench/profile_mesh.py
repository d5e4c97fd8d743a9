"""py-spy profiles of each mesh service under uncached Asks, for any checkout (before/after flame graphs, issue 12).

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.profile_mesh --tree /tmp/base --out /tmp/prof/before
    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.profile_mesh --tree . --out bench/results/profiles \\
        --suffix after

Starts the mesh of --tree (its own services and bench helpers: the load runs in a child with cwd and PYTHONPATH set
to that tree, with this venv's python), ingests the sample corpus, warms up, then records each service with py-spy
(--nonblocking, so the sampled process is never paused) for --seconds while --concurrency callers send uncached
one-token Asks (the shape of bench/ask_cost.py phase 1: every Ask embeds, retrieves and generates). Writes
<out>/<service>-<suffix>.svg (or .txt with --format raw: collapsed stacks for a text summary).
--sim-ttft-ms, --sim-tokens-per-second and --sim-max-tokens give the sim LLM another shape: gateway_bench's
concurrent-streams search (TTFT 200 ms, 20 tokens/s) is

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.profile_mesh --out bench/results/profiles \
        --suffix streams200 --concurrency 200 --sim-ttft-ms 200 --sim-tokens-per-second 20 --sim-max-tokens 100
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SERVICES = ("embedding", "retrieval", "generation", "gateway")
ONE_TOKEN_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 1}


def _child(args: argparse.Namespace) -> int:
    """Runs inside --tree: every import below is that tree's."""
    import asyncio
    import tempfile
    import time
    import uuid

    import grpc

    from bench._sim import SimProcess
    from services.cli.ingest import ingest_path
    from services.cli.mesh import LocalMesh
    from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

    questions = [
        "How do honey bees tell each other where flowers are?", "What is the waggle dance?",
        "What is the round dance used for?", "How do bees make honey?", "How is beeswax produced?",
        "Why do colonies swarm?", "How do bees keep the hive warm in winter?", "What senses do bees have?",
    ]
    redis_url = os.environ.get("RAGFLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ext = "svg" if args.format == "flamegraph" else "txt"

    async def ask(stub, i: int) -> None:
        request = gateway_pb2.AskRequest(question=questions[i % len(questions)], bypass_cache=True)
        async for _ in stub.Ask(request, timeout=60):
            pass

    async def main() -> None:
        sim = SimProcess()
        prefix = f"ragfleet-bench:{uuid.uuid4().hex[:8]}:prof:"
        env = {"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm", "RAGFLEET_LOG_LEVEL": "WARNING",
               "RAGFLEET_GATEWAY_API_KEYS": "", "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix,
               "RAGFLEET_GATEWAY_CORPUS_VERSION_KEY": prefix + "version:{tenant}", "RAGFLEET_REDIS_URL": ""}
        mesh = LocalMesh(data_dir=Path(tempfile.mkdtemp(prefix="profile-mesh-")), env=env,
                         service_env={"gateway": {"RAGFLEET_REDIS_URL": redis_url}})
        try:
            mesh.start()
            ingest_path(mesh.address("gateway"), str(Path("services/cli/sample_corpus")), show_progress=False)
            sim.configure({"ttft_ms": args.sim_ttft_ms, "tokens_per_second": args.sim_tokens_per_second,
                           "max_tokens": args.sim_max_tokens})
            async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                # warm-up: connections, caches, first-call paths (at once: a streaming sim's Ask lasts seconds)
                await asyncio.gather(*(ask(stub, i) for i in range(30)))
                spies = [subprocess.Popen(
                    [py_spy, "record", "-p", str(mesh.processes[name].process.pid), "-d", str(args.seconds),
                     "-r", str(args.rate), "-f", args.format, "--nonblocking",
                     "-o", str(out / f"{name}-{args.suffix}.{ext}")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in SERVICES]
                asks = 0
                stop = time.monotonic() + args.seconds

                async def caller(k: int) -> None:
                    nonlocal asks
                    while time.monotonic() < stop:
                        await ask(stub, asks + k)
                        asks += 1

                await asyncio.gather(*(caller(k) for k in range(args.concurrency)))
                for spy in spies:
                    spy.wait()
                print(f"{asks} Asks in {args.seconds} s ({args.concurrency} callers); profiles in {out}")
        finally:
            mesh.stop()
            sim.stop()

    asyncio.run(main())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=".", help="the checkout whose mesh is profiled")
    parser.add_argument("--out", required=True, help="directory for <service>-<suffix>.svg")
    parser.add_argument("--suffix", default="before", help="file name suffix (before, after)")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--concurrency", type=int, default=1, help="Asks in flight")
    parser.add_argument("--format", choices=("flamegraph", "raw"), default="flamegraph")
    parser.add_argument("--sim-ttft-ms", type=float, default=ONE_TOKEN_SIM["ttft_ms"])
    parser.add_argument("--sim-tokens-per-second", type=float, default=ONE_TOKEN_SIM["tokens_per_second"])
    parser.add_argument("--sim-max-tokens", type=int, default=ONE_TOKEN_SIM["max_tokens"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    tree = Path(args.tree).resolve()
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(Path(args.out).resolve()),
            "--suffix", args.suffix, "--seconds", str(args.seconds), "--rate", str(args.rate),
            "--concurrency", str(args.concurrency), "--format", args.format,
            "--sim-ttft-ms", str(args.sim_ttft_ms), "--sim-tokens-per-second", str(args.sim_tokens_per_second),
            "--sim-max-tokens", str(args.sim_max_tokens)]
    return subprocess.run(argv, cwd=tree, env=os.environ | {"PYTHONPATH": str(tree)}).returncode


if __name__ == "__main__":
    sys.exit(main())
