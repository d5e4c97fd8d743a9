"""Gateway benchmark (issue 4): cached Ask latency, mesh overhead, parallel vs sequential fan-out, concurrent streams.

Runs the real mesh (four service processes, LocalMesh) against the simulated LLM (its own process) and drives it
from this process (the load generator). All of them share the machine's cores; that is recorded in the result.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.gateway_bench            # full run (< 10 min)
    .venv/bin/python -m bench.gateway_bench --quick                                    # smoke run (~1 min)

Phases:
1. cached Ask end to end: one question answered once, then asked again and again through the gateway
   (L1 entry + one Redis round trip for the corpus version), client-side time from call to the final event.
2. mesh overhead: uncached Ask time to first token through the mesh minus the SAME stages run in-process (the
   gateway's AskPipeline calling the embedding, retrieval and generation servicers directly, no gRPC), interleaved.
3. fan-out: the pipeline in-process with controlled branch latencies (cache 10 ms, history 15 ms, embed 20 ms,
   2 query variants x 15 ms search), parallel vs sequential: time to Sources vs max-of-branches and sum models.
4. concurrency: 100/500/1000 Ask streams against the sim LLM (TTFT 200 ms, 20 tokens/s, 100 tokens), started over a
   5 s ramp so that all are open at once (500 streams = 100 new Asks/s); TTFT percentiles, errors by code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator


import grpc

from bench._common import (LOAD_SIM, QUESTIONS, REDIS_URL, ROOT, SAMPLE_CORPUS, ask_once, percentiles, target,
                           write_results)
from bench._sim import SimProcess, cpu_seconds
from services.cli.ingest import ingest_path
from services.cli.mesh import LocalMesh, free_port
from services.gateway.ask import AskPipeline
from services.gateway.chunker import load_tokenizer
from services.gateway.config import AskLimits, CacheConfig, ConversationConfig, IngestConfig, StageBudgets
from services.gateway.conversations import ConversationStore
from services.gateway.deadlines import Deadline
from services.gateway.ingest import Ingestor
from services.gateway.response_cache import ResponseCache
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests._redis import delete_keys

FAST_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 8}


# -- the same stages in-process: servicers called directly, behind the gateway's client interfaces -----------------

class _Context:
    """The slice of grpc.aio.ServicerContext the servicers use: no deadline, no metadata."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()


class InProcessEmbedding:
    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    async def embed(self, texts, *, input_type, timeout):  # type: ignore[no-untyped-def]
        from services.runtime.pb.ragfleet.v1 import embedding_pb2

        return await self._servicer.Embed(embedding_pb2.EmbedRequest(texts=list(texts), input_type=input_type),
                                          _Context())


class InProcessRetrieval:
    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    async def search(self, request, *, timeout):  # type: ignore[no-untyped-def]
        return await self._servicer.Search(request, _Context())

    async def upsert(self, request, *, timeout):  # type: ignore[no-untyped-def]
        return await self._servicer.Upsert(request, _Context())


class InProcessGeneration:
    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    async def generate_stream(self, request, *, timeout) -> AsyncIterator[Any]:  # type: ignore[no-untyped-def]
        async for event in self._servicer.Generate(request, _Context()):
            yield event


class InProcessStack:
    """Embedding, retrieval and generation servicers built exactly as their servers build them, in this process."""

    async def start(self, env: dict[str, str]) -> "InProcessStack":
        from services.embedding.config import EmbeddingConfig
        from services.embedding.server import build as build_embedding
        from services.generation.config import GenerationConfig
        from services.generation.server import build as build_generation
        from services.retrieval.config import RetrievalConfig
        from services.retrieval.server import build as build_retrieval

        environ = {**os.environ, **env}
        self._started = [await build_embedding(EmbeddingConfig.from_env(environ)),
                         await build_retrieval(RetrievalConfig.from_env(environ)),
                         await build_generation(GenerationConfig.from_env(environ))]
        embedding, retrieval, generation = (started.bindings[0].servicer for started in self._started)
        self.embedding = InProcessEmbedding(embedding)
        self.retrieval = InProcessRetrieval(retrieval)
        self.generation = InProcessGeneration(generation)
        return self

    def pipeline(self, *, cache: ResponseCache | None = None, conversations: ConversationStore | None = None,
                 limits: AskLimits = AskLimits(), embedding: Any = None, retrieval: Any = None) -> AskPipeline:
        return AskPipeline(embedding=embedding or self.embedding, retrieval=retrieval or self.retrieval,
                           generation=self.generation,
                           cache=cache or ResponseCache(CacheConfig(enabled=False), None),
                           conversations=conversations or ConversationStore(ConversationConfig(), None, prefix="b:"),
                           limits=limits, budgets=StageBudgets())

    async def ingest(self, tenant: str, documents: list[gateway_pb2.Document]) -> None:
        ingestor = Ingestor(embedding=self.embedding, retrieval=self.retrieval,
                            cache=ResponseCache(CacheConfig(enabled=False), None),
                            tokenizer=load_tokenizer(None), config=IngestConfig(), budgets=StageBudgets())
        await ingestor.ingest(tenant, gateway_pb2.IngestRequest(documents=documents), Deadline(None))

    async def close(self) -> None:
        for started in reversed(self._started):
            if started.on_stop is not None:
                await started.on_stop()


def sample_documents() -> list[gateway_pb2.Document]:
    from services.cli.ingest import read_documents

    return list(read_documents(SAMPLE_CORPUS))


# -- measurements ---------------------------------------------------------------------------------------------------

async def inprocess_ttft(pipeline: AskPipeline, question: str, **fields: Any) -> float:
    started = time.perf_counter()
    request = gateway_pb2.AskRequest(question=question, **fields)
    first = 0.0
    async for event in pipeline.stream("default", request, pipeline.plan("default", request), Deadline(None)):
        if event.WhichOneof("event") == "delta" and not first:
            first = (time.perf_counter() - started) * 1000
    return first


async def measure_floor(n: int) -> dict[str, Any]:
    """Python gRPC's own cost here: a bare grpc.aio server process (bench/_floor_server.py), no interceptors, no
    work. A unary Embed and a 3-message stream shaped like a cached answer, client-side, same client as the mesh."""
    from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench._floor_server", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            embed = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            ask = gateway_pb2_grpc.GatewayServiceStub(channel)
            request = embedding_pb2.EmbedRequest(texts=[QUESTIONS[0]])
            unary, stream = [], []
            for i in range(n + 50):  # the first 50 warm up
                started = time.perf_counter()
                await embed.Embed(request, timeout=10)
                middle = time.perf_counter()
                async for _ in ask.Ask(gateway_pb2.AskRequest(question=QUESTIONS[0]), timeout=10):
                    pass
                if i >= 50:
                    unary.append((middle - started) * 1000)
                    stream.append((time.perf_counter() - middle) * 1000)
    finally:
        process.terminate()
        process.wait(10)
    return {"unary_ms": percentiles(unary), "stream_ms": percentiles(stream)}


async def measure_cached(stub: Any, n: int) -> dict[str, Any]:
    question = QUESTIONS[0]
    await ask_once(stub, question)
    latencies, statuses = [], Counter()
    for _ in range(n):
        _, total, finished = await ask_once(stub, question)
        latencies.append(total)
        statuses[gateway_pb2.CacheStatus.Name(finished.cache_status)] += 1
    return {"latency_ms": percentiles(latencies), "statuses": dict(statuses), "raw_ms": latencies}


async def measure_overhead(stub: Any, stack: InProcessStack, n: int) -> dict[str, Any]:
    pipeline = stack.pipeline()
    for question in QUESTIONS:  # warm both sides' embedding caches and connections alike
        await ask_once(stub, question, bypass_cache=True)
        await inprocess_ttft(pipeline, question, bypass_cache=True)
    mesh, local, diffs = [], [], []
    rng = random.Random(7)
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        order = [0, 1] if rng.random() < 0.5 else [1, 0]
        pair = [0.0, 0.0]
        for side in order:
            if side == 0:
                pair[0] = (await ask_once(stub, question, bypass_cache=True))[0]
            else:
                pair[1] = await inprocess_ttft(pipeline, question, bypass_cache=True)
        mesh.append(pair[0])
        local.append(pair[1])
        diffs.append(pair[0] - pair[1])
    m, l = percentiles(mesh), percentiles(local)
    return {"mesh_ttft_ms": m, "inprocess_ttft_ms": l, "overhead_p50_ms": m["p50"] - l["p50"],
            "paired_difference_ms": percentiles(diffs), "raw_mesh_ms": mesh, "raw_inprocess_ms": local}


class _Delayed:
    """Wraps a client (or store) and sleeps before chosen methods: controlled branch latencies."""

    def __init__(self, inner: Any, delays: dict[str, float]) -> None:
        self._inner = inner
        self._delays = delays

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        delay = self._delays.get(name)
        if delay is None:
            return attr

        async def delayed(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(delay)
            return await attr(*args, **kwargs)

        return delayed


async def measure_fanout(stack: InProcessStack, n: int) -> dict[str, Any]:
    branches = {"cache": 0.010, "history": 0.015, "embed": 0.020, "search_per_variant": 0.015}
    out: dict[str, Any] = {"branch_delays_ms": {k: v * 1000 for k, v in branches.items()}, "variants": 2}
    # "baseline": the same real stages with no added delay, so each mode's ADDED time can be set against the
    # models (the real embedding/search work is on top of the delays in both modes).
    for mode, parallel, scale in (("baseline", True, 0.0), ("parallel", True, 1.0), ("sequential", False, 1.0)):
        delay = {k: v * scale for k, v in branches.items()}
        cache = ResponseCache(CacheConfig(), None)
        cache.lookup = _Delayed(cache, {"lookup": delay["cache"]}).lookup  # type: ignore[method-assign]
        conversations = _Delayed(ConversationStore(ConversationConfig(), None, prefix="b:"),
                                 {"history": delay["history"]})
        pipeline = stack.pipeline(cache=cache, conversations=conversations,  # type: ignore[arg-type]
                                  limits=AskLimits(query_variants=2, parallel_fanout=parallel),
                                  embedding=_Delayed(stack.embedding, {"embed": delay["embed"]}),
                                  retrieval=_Delayed(stack.retrieval, {"search": delay["search_per_variant"]}))
        times = []
        for i in range(n):
            request = gateway_pb2.AskRequest(question=f"{QUESTIONS[i % len(QUESTIONS)]} [{mode} {i}]",
                                             conversation_id=uuid.uuid4().hex)
            started = time.perf_counter()
            events = pipeline.stream("default", request, pipeline.plan("default", request), Deadline(None))
            async for event in events:
                if event.WhichOneof("event") == "sources":
                    times.append((time.perf_counter() - started) * 1000)
            # (the rest of the stream is drained by the loop; only time to Sources is the fan-out)
        out[mode] = percentiles(times)
    b = out["branch_delays_ms"]
    out["model_max_ms"] = max(b["cache"], b["history"], b["embed"]) + b["search_per_variant"]
    out["model_sum_ms"] = b["cache"] + b["history"] + b["embed"] + 2 * b["search_per_variant"]
    for mode in ("parallel", "sequential"):
        out[f"{mode}_added_ms"] = out[mode]["p50"] - out["baseline"]["p50"]
    return out


async def _sample_cores(pids: dict[str, int], timeline: list[float]) -> None:
    """Cores used by all the benchmark's processes together, second by second (an average over a whole phase
    hides the seconds when every stream is open and the machine is saturated)."""
    before, started = sum(cpu_seconds(pid) for pid in pids.values()), time.perf_counter()
    while True:
        await asyncio.sleep(1.0)
        now, at = sum(cpu_seconds(pid) for pid in pids.values()), time.perf_counter()
        timeline.append((now - before) / (at - started))
        before, started = now, at


async def measure_concurrency(address: str, sim: SimProcess, levels: list[int], ramp_s: float,
                              pids: dict[str, int]) -> dict[str, Any]:
    sim.configure(LOAD_SIM)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        baseline = [(await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True, first_token_only=True))[0]
                    for i in range(10)]
        base_p50 = percentiles(baseline)["p50"]
        results: dict[str, Any] = {"baseline_ttft_ms": percentiles(baseline), "ramp_seconds": ramp_s, "levels": {}}
        for n in levels:
            open_streams = peak = 0
            ttfts: list[float] = []
            codes: Counter = Counter()
            t0 = time.perf_counter() + 0.2

            async def one(i: int) -> None:
                nonlocal open_streams, peak
                await asyncio.sleep(max(0.0, t0 + i * ramp_s / n - time.perf_counter()))
                started = time.perf_counter()
                open_streams += 1
                peak = max(peak, open_streams)
                try:
                    first = 0.0
                    async for event in stub.Ask(gateway_pb2.AskRequest(question=QUESTIONS[i % len(QUESTIONS)],
                                                                       bypass_cache=True), timeout=60):
                        if not first and event.WhichOneof("event") == "delta":
                            first = (time.perf_counter() - started) * 1000
                    ttfts.append(first)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                finally:
                    open_streams -= 1

            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            wall = time.perf_counter()
            timeline: list[float] = []
            sampler = asyncio.create_task(_sample_cores(pids, timeline))
            await asyncio.gather(*(one(i) for i in range(n)))
            sampler.cancel()
            wall = time.perf_counter() - wall
            cores = {name: (cpu_seconds(pid) - cpu_before[name]) / wall for name, pid in pids.items()}
            stats = percentiles(ttfts)
            errors = sum(c for code, c in codes.items() if code not in ("OK", "RESOURCE_EXHAUSTED"))
            results["levels"][str(n)] = {
                "streams": n, "peak_open_streams": peak, "wall_seconds": wall, "ttft_ms": stats,
                "added_ttft_p99_ms": stats["p99"] - base_p50, "codes": dict(codes),
                "rejected_resource_exhausted": codes.get("RESOURCE_EXHAUSTED", 0), "other_errors": errors,
                "cores_used": cores, "cores_per_second": timeline, "peak_cores": max(timeline, default=0.0)}
            print(f"  {n} streams: {dict(codes)} ttft p50 {stats['p50']:.0f} p99 {stats['p99']:.0f} ms "
                  f"(peak open {peak}; cores used {sum(cores.values()):.2f} on average, "
                  f"{max(timeline, default=0.0):.2f} at the busiest second)", flush=True)
            await asyncio.sleep(2.0)
    return results


# -- report ---------------------------------------------------------------------------------------------------------

def report(figures: dict[str, Any], levels: list[int]) -> tuple[list[dict[str, Any]], str]:
    cached = figures["cached"]["latency_ms"]
    overhead = figures["overhead"]
    fan = figures["fanout"]
    conc = figures["concurrency"]["levels"]
    targets = [
        target("cached Ask p50 (ms)", cached["p50"], "<= 1", cached["p50"] <= 1),
        target("cached Ask p99 (ms)", cached["p99"], "<= 5", cached["p99"] <= 5),
        target("mesh overhead TTFT p50 (ms)", overhead["overhead_p50_ms"], "<= 3", overhead["overhead_p50_ms"] <= 3),
        target("parallel fan-out: added time / max-of-branches model", fan["parallel_added_ms"] / fan["model_max_ms"],
               "<= 1.1", fan["parallel_added_ms"] / fan["model_max_ms"] <= 1.1),
    ]
    if "500" in conc:
        c = conc["500"]
        errors = sum(v for k, v in c["codes"].items() if k != "OK")
        targets.append(target("500 streams: added TTFT p99 (ms)", c["added_ttft_p99_ms"], "<= 50",
                               c["added_ttft_p99_ms"] <= 50))
        targets.append(target("500 streams: errors", errors, "== 0", errors == 0))
    if "1000" in conc:
        c = conc["1000"]
        targets.append(target("1000 streams: errors other than RESOURCE_EXHAUSTED", c["other_errors"], "== 0",
                              c["other_errors"] == 0))
    floor = figures["floor"]
    lines = ["## Cached Ask (end to end through the gateway)", "",
             "| call | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|",
             f"| cached Ask through the gateway ({cached['n']} asks) | {cached['p50']:.3f} | {cached['p95']:.3f} | "
             f"{cached['p99']:.3f} |",
             f"| floor: bare grpc.aio 3-message stream, same shape | {floor['stream_ms']['p50']:.3f} | "
             f"{floor['stream_ms']['p95']:.3f} | {floor['stream_ms']['p99']:.3f} |",
             f"| floor: bare grpc.aio unary Embed | {floor['unary_ms']['p50']:.3f} | {floor['unary_ms']['p95']:.3f} | "
             f"{floor['unary_ms']['p99']:.3f} |", "",
             f"statuses {figures['cached']['statuses']}; the floors are a server process with no interceptors and "
             "no work (bench/_floor_server.py): Python gRPC's own cost on this machine.", "",
             "## Mesh overhead (uncached Ask, time to first token)", "",
             "| path | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    for name, key in (("mesh (4 processes, gRPC)", "mesh_ttft_ms"), ("in-process (same stages)", "inprocess_ttft_ms")):
        s = overhead[key]
        lines.append(f"| {name} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} |")
    four_hop_floor = 2 * floor["stream_ms"]["p50"] + 2 * floor["unary_ms"]["p50"]
    lines += ["", f"overhead p50 = {overhead['overhead_p50_ms']:.2f} ms; paired difference p50 "
              f"{overhead['paired_difference_ms']['p50']:.2f} ms; the same four hops on the bare floor "
              f"(2 streams + 2 unary calls) = {four_hop_floor:.2f} ms", "",
              "## Fan-out (time to Sources, controlled branch latencies)", "",
              f"branches (ms): {fan['branch_delays_ms']}, {fan['variants']} query variants", "",
              "| mode | p50 ms | added over baseline ms | model ms |", "|---|---|---|---|",
              f"| baseline (no added delay) | {fan['baseline']['p50']:.1f} | 0 | 0 |",
              f"| parallel | {fan['parallel']['p50']:.1f} | {fan['parallel_added_ms']:.1f} | "
              f"max of branches {fan['model_max_ms']:.0f} |",
              f"| sequential | {fan['sequential']['p50']:.1f} | {fan['sequential_added_ms']:.1f} | "
              f"sum of branches {fan['model_sum_ms']:.0f} |", "",
              "## Concurrent Ask streams (sim LLM: TTFT 200 ms, 20 tokens/s, 100 tokens)", "",
              f"baseline TTFT p50 at concurrency 1: {figures['concurrency']['baseline_ttft_ms']['p50']:.1f} ms; "
              f"streams started over a {figures['concurrency']['ramp_seconds']:.0f} s ramp", "",
              "| streams | peak open | TTFT p50 | p95 | p99 | added p99 | codes | cores at the busiest second | "
              "cores used on average (by process) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in levels:
        c = conc[str(n)]
        s = c["ttft_ms"]
        cores = ", ".join(f"{k} {v:.2f}" for k, v in c["cores_used"].items())
        lines.append(f"| {n} | {c['peak_open_streams']} | {s['p50']:.0f} | {s['p95']:.0f} | {s['p99']:.0f} | "
                     f"{c['added_ttft_p99_ms']:.0f} | {c['codes']} | {c.get('peak_cores', 0.0):.2f} of "
                     f"{os.cpu_count()} | {sum(c['cores_used'].values()):.2f}: {cores} |")
    return targets, "\n".join(lines)


def plot(figures: dict[str, Any], levels: list[int]):  # type: ignore[no-untyped-def]
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        ax = axes[0][0]
        ax.hist(figures["cached"]["raw_ms"], bins=60, color="tab:green")
        ax.set(title="cached Ask latency", xlabel="ms", ylabel="asks")
        ax = axes[0][1]
        ax.hist([figures["overhead"]["raw_mesh_ms"], figures["overhead"]["raw_inprocess_ms"]], bins=40,
                label=["mesh", "in-process"])
        ax.set(title="uncached TTFT: mesh vs in-process", xlabel="ms")
        ax.legend()
        ax = axes[1][0]
        fan = figures["fanout"]
        names = ["parallel", "max model", "sequential", "sum model"]
        values = [fan["parallel_added_ms"], fan["model_max_ms"], fan["sequential_added_ms"], fan["model_sum_ms"]]
        ax.bar(names, values, color=["tab:blue", "lightsteelblue", "tab:orange", "navajowhite"])
        ax.set(title="fan-out: added time to Sources over no-delay baseline (p50)", ylabel="ms")
        ax = axes[1][1]
        conc = figures["concurrency"]["levels"]
        for key, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(levels, [conc[str(n)]["ttft_ms"][key] for n in levels], style, label=f"TTFT {key}")
        ax.axhline(figures["concurrency"]["baseline_ttft_ms"]["p50"] + 50, color="red", lw=0.8,
                   label="baseline + 50 ms")
        ax.set(title="concurrent streams (sim TTFT 200 ms, 20 tok/s)", xlabel="streams", ylabel="ms")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)

    return draw


async def run(args: argparse.Namespace) -> int:
    levels = [50, 100] if args.quick else [100, 500, 1000]
    n_cached, n_overhead, n_fanout = (300, 40, 10) if args.quick else (2000, 200, 30)
    sim = SimProcess()
    run_id = uuid.uuid4().hex[:8]
    prefix = f"ragfleet-bench:{run_id}:gw:"
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    env = {"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm", "RAGFLEET_LOG_LEVEL": "WARNING",
           "RAGFLEET_GATEWAY_API_KEYS": "", "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix, "RAGFLEET_REDIS_URL": ""}
    # Redis only for the gateway (response cache): embedding/retrieval keep L1 caches only, exactly like the
    # in-process stack, so phase 2 compares the same work. The gateway's answers are under this run's prefix; the
    # corpus version it reads is the runtime's shared key for tenant "default" (not per run), which this run never
    # writes (retrieval has no Redis here), so only another process writing that tenant's version could cost hits.
    mesh = LocalMesh(data_dir=workdir / "mesh", env=env, service_env={"gateway": {"RAGFLEET_REDIS_URL": REDIS_URL}})
    stack = InProcessStack()
    figures: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        mesh.start()
        figures["mesh_start_seconds"] = time.perf_counter() - started
        print(f"mesh up in {figures['mesh_start_seconds']:.1f}s; ingesting the sample corpus", flush=True)
        ingest_path(mesh.address("gateway"), str(SAMPLE_CORPUS), show_progress=False)
        await stack.start({**env, "RAGFLEET_DATA_DIR": str(workdir / "inprocess")})
        await stack.ingest("default", sample_documents())
        sim.configure(FAST_SIM)
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            print("phase 0: transport floor", flush=True)
            figures["floor"] = await measure_floor(n_cached // 2)
            print("phase 1: cached Ask", flush=True)
            figures["cached"] = await measure_cached(stub, n_cached)
            print("phase 2: mesh overhead", flush=True)
            figures["overhead"] = await measure_overhead(stub, stack, n_overhead)
        print("phase 3: fan-out", flush=True)
        figures["fanout"] = await measure_fanout(stack, n_fanout)
        await stack.close()
        print("phase 4: concurrent streams", flush=True)
        pids = {name: proc.process.pid for name, proc in mesh.processes.items()}
        pids |= {"sim-llm": sim.process.pid, "load generator": os.getpid()}
        figures["concurrency"] = await measure_concurrency(mesh.address("gateway"), sim, levels, args.ramp, pids)
        figures["load_average_after"] = os.getloadavg()
    finally:
        mesh.stop()
        sim.stop()
        delete_keys(prefix + "*", url=REDIS_URL)
    targets, markdown = report(figures, levels)
    notes = [f"All processes share this machine's {os.cpu_count()} cores: the load generator (this process, which "
             "also hosts the in-process stack of phase 2), the sim LLM (its own process) and the four mesh services.",
             "Concurrency phase: bypass_cache=True (every Ask runs embed + retrieve + generate); questions come from "
             f"a pool of {len(QUESTIONS)}, so query embeddings are served by the embedding service's own cache.",
             "Gateway: default MAX_IN_FLIGHT (512), so at 1000 streams the overflow is refused with "
             "RESOURCE_EXHAUSTED by design (counted, not an error).",
             "Mesh overhead covers 4 gRPC hops (client->gateway, gateway->embedding, ->retrieval, ->generation), "
             "tracing interceptors included; the LLM stage (sim, TTFT 0) is identical on both paths."]
    write_results("gateway_bench_quick" if args.quick else "gateway_bench", figures=figures, targets=targets,
                  markdown=markdown, plot=plot(figures, levels), notes=notes)
    for t in targets:
        print(f"  {t['name']}: {t['value']:.4g} (goal {t['goal']}) {'met' if t['met'] else 'NOT met'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM (e.g. from `timeout`) must still stop the mesh and the sim: turn it into SystemExit for `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: 50/100 streams, fewer samples")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the concurrent streams start")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
