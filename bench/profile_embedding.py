"""py-spy profiles of the embedding service and of its bare gRPC+model floor under 64 single-text callers.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.profile_embedding --out bench/results/profiles

The shape of bench/embedding_bench.py's 64-caller cell (issue 12: >= 0.95 of the in-process ceiling): fresh SciFact
texts, one per Embed, int8 compute, L1 off, no Redis. The service (`python -m services.embedding`) and the floor
(bench/_embedding_floor.py: a bare grpc.aio Embed over the same OnnxBackend, no batcher, cache, auth, metrics or
tracing) each take --seconds of that load in turn while py-spy (--nonblocking) records them. Writes
<out>/embedding-64callers-{service,floor}.svg and prints each one's texts/s, so the two graphs can be read beside the
figures of one run: where the floor's own time goes is what keeps both below the in-process ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.embedding_bench import FloorServer, TextPool, drive, start_service, warm_up
from services.runtime.pb.ragfleet.v1 import embedding_pb2_grpc

COMPUTE_ENV = {"RAGFLEET_EMBEDDING_ONNX_COMPUTE": "int8"}
TEXTS_PER_SECOND_BOUND = 350  # more texts than either can embed in --seconds: the load lasts the whole recording


async def _profile(name: str, channel, pid: int, texts: list[str], args: argparse.Namespace, out: Path) -> None:
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    await warm_up(stub, texts[:200], args.callers)
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid),
                            "-d", str(args.seconds), "-r", str(args.rate), "--nonblocking",
                            "-o", str(out / f"embedding-64callers-{name}.svg")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rate = (await drive(stub, texts[200:], args.callers, seconds=args.seconds))["texts_per_s"]
    spy.wait()
    print(f"{name}: {rate:.1f} texts/s under {args.callers} callers, profiled for {args.seconds} s", flush=True)


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool = TextPool(args.seed)
    with tempfile.TemporaryDirectory(prefix="profile-embedding-") as tmp:
        workdir = Path(tmp)
        mesh = start_service(workdir, "service", COMPUTE_ENV)
        try:
            async with mesh.internal_channel("embedding", aio=True) as channel:
                await _profile("service", channel, mesh.processes["embedding"].process.pid,
                               pool.draw(200 + TEXTS_PER_SECOND_BOUND * args.seconds), args, out)
        finally:
            mesh.stop()
        floor = FloorServer(workdir, COMPUTE_ENV)
        try:
            async with floor.channel() as channel:
                await _profile("floor", channel, floor.process.pid,
                               pool.draw(200 + TEXTS_PER_SECOND_BOUND * args.seconds), args, out)
        finally:
            floor.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the two SVGs")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--seed", type=int, default=7)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
