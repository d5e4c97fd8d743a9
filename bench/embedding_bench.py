"""Embedding service benchmark (issue 5): micro-batching vs none, local ONNX and remote backends, the model's
in-process ceiling, and cache hit vs miss latency, all in one run.

The services run as real processes (LocalMesh, `python -m services.embedding`), the simulated OpenAI-compatible
endpoint as its own process (`python -m services.cli sim-llm`), and this process is the load generator: every
process shares the machine's cores, which the result records.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.embedding_bench            # full run (~20 min on 2 cores)
    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.embedding_bench --quick    # smoke run (~1-2 min)

The full run first waits (up to --quiet-timeout s) until other work leaves the cores alone, and records how much
other work ran during each phase.

Texts: SciFact (fixed seed), 85 % single abstract sentences and 15 % whole abstracts (truncated at 256 tokens), all
distinct, so a model batch in arrival order mixes 20-token and 256-token texts as real traffic does.

Compute: the local phases (1-3) run the ONNX backend in `--compute` (default: the service's default,
RAGFLEET_EMBEDDING_ONNX_COMPUTE=int8), which every service they start is given explicitly; phase 5 runs every compute
in `--policy-computes` (default int8 and float32) in the same run.

Phases:
1. ceiling: the ONNX backend in this process (no gRPC, no service) over batch sizes 1..64 on the sweep texts, run
   the way the service runs that compute. float32 (one padded batch at a time on one intra-op thread per core):
   batches in arrival order (naive batching), sorted by length within windows of 64 arrivals (the most a batcher
   that sees 64 queued texts can do), and sorted globally (perfect grouping, an upper bound no online batcher
   reaches), with onnxruntime's thread spinning on (the model alone at its best). int8 (each text run alone on one
   thread, `backend.max_in_flight` embed calls at once): `max_in_flight` concurrent embed calls taking batches in
   arrival order (nothing is padded, so sorting changes nothing; spinning does nothing with one intra-op thread),
   plus one call at a time at batch 1 for reference. The ceiling of the targets is the best arrival-order figure,
   re-measured after the sweep (the higher one counts).
2. local sweep: N = 1, 8, 64, 256 concurrent gRPC callers, one text per call, each text once, against two services
   (batching on, batching off) with L1 off and no Redis, so the model is measured, not the cache, and against the
   bare floor (bench/_embedding_floor.py): a bare grpc.aio server, no interceptors, auth, metrics, tracing, cache or
   batcher, doing the service's model work (its tokenizer and OnnxBackend, from the same environment) per request.
   It is what gRPC plus the model reach on this machine with the load generator beside them, so the gap from the
   ceiling splits into the floor's (Python gRPC, the load generator) and the service's own. All three are up for
   the whole phase; at N = 1 calls alternate between them text by text (paired p99), larger N run one at a time in
   turn, each after its own warm-up.
3. cache: two replicas with L1 and Redis L2 (own key prefix, deleted afterwards); per text, a miss on replica A,
   the L1 hit on A, the L2 hit on B (a replica that never saw it), then B's promoted L1 hit; one caller. Then the
   gRPC capacity: 64 callers of cached texts (no model, no HTTP), the most any backend can get through gRPC here.
4. remote sweep: the same N sweep with RAGFLEET_EMBEDDING_BACKEND=openai against the sim LLM (10 ms per HTTP call
   + 0.2 ms per text), batching on vs off, default max 2 HTTP calls in flight.
5. policies (issue 14), once per compute: three local services, RAGFLEET_EMBEDDING_BATCH_POLICY=bounded (the
   default), the same with a fixed reorder window, and =length (pure length grouping), on half short queries
   (SciFact claims) and half ~256-token chunks, at 1, 8 and 64 callers: p50/p95/p99, p99/p50 and throughput,
   interleaved (1 caller text by text, 8 and 64 in ABC/CBA blocks on the same texts) so machine noise hits all
   alike. `--policies-only` runs this phase alone (results in *_quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._common import REDIS_URL, ROOT, percentiles, stop_process, target, write_results
from bench._sim import SimProcess, cpu_seconds
from services.cli.mesh import LocalMesh, free_port
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

SCIFACT = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
SEED = 5
SENTENCE_SHARE = 0.85
CALLERS = (1, 8, 64, 256)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
WINDOW = 64
SIM_CALL_MS = 10.0
SIM_PER_TEXT_MS = 0.2
# The unbatched baseline: every text its own model batch, with no wait for company.
UNBATCHED = {"RAGFLEET_EMBEDDING_MAX_BATCH_SIZE": "1", "RAGFLEET_EMBEDDING_MAX_WAIT_MS": "0"}
# The local sweep's third server: bench/_embedding_floor.py, bare gRPC plus the service's model work.
FLOOR = "bare_floor"
MODE_LABELS = {"batched": "batched", "unbatched": "unbatched", FLOOR: "bare floor"}
RPC_TIMEOUT = 300.0
QUERY = common_pb2.INPUT_TYPE_QUERY
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# -- texts ----------------------------------------------------------------------------------------------------------

class TextPool:
    """SciFact texts in a seeded random order; each `draw` takes fresh ones (distinct from every earlier draw):
    SENTENCE_SHARE single sentences, the rest whole abstracts."""

    def __init__(self, seed: int) -> None:
        docs = [json.loads(line) for line in SCIFACT.read_text(encoding="utf-8").splitlines() if line.strip()]
        self._rng = random.Random(seed)
        self._rng.shuffle(docs)
        half = len(docs) // 2  # abstracts and sentences from different documents
        self._abstracts = list(dict.fromkeys(" ".join(d["text"].split()) for d in docs[:half]
                                             if len(d["text"].split()) >= 60))
        sentences = [" ".join(s.split()) for d in docs[half:] for s in _SENTENCE_SPLIT.split(d["text"])
                     if len(s.split()) >= 4]
        self._sentences = list(dict.fromkeys(sentences))
        self._rng.shuffle(self._sentences)
        self._next_abstract = self._next_sentence = 0

    def draw(self, count: int) -> list[str]:
        n_abstracts = round(count * (1 - SENTENCE_SHARE))
        texts = self._abstracts[self._next_abstract:self._next_abstract + n_abstracts]
        texts += self._sentences[self._next_sentence:self._next_sentence + count - n_abstracts]
        if len(texts) != count:
            raise RuntimeError(f"SciFact pool exhausted drawing {count} texts")
        self._next_abstract += n_abstracts
        self._next_sentence += count - n_abstracts
        self._rng.shuffle(texts)
        return texts


# -- how busy the machine was ------------------------------------------------------------------------------------------

class CpuMeter:
    """CPU-seconds the whole machine spent busy vs this process and its (exited, reaped) children: the remainder is
    other work on the machine during a phase, i.e. noise the figures carry."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self.phases: dict[str, dict[str, float]] = {}
        self._mark = self._read()

    def _read(self) -> tuple[float, float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / self._tick  # all but idle and iowait
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def phase(self, name: str) -> None:
        """Close the phase that started at the last mark (call after its service processes have exited)."""
        now = self._read()
        wall, busy, own = (now[i] - self._mark[i] for i in range(3))
        self._mark = now
        cores = os.cpu_count() or 1
        self.phases[name] = {"wall_seconds": wall, "machine_busy_cpu_s": busy, "bench_cpu_s": own,
                             "other_cpu_s": max(0.0, busy - own),
                             "other_share_of_machine": max(0.0, busy - own) / (wall * cores) if wall else 0.0}


def wait_for_quiet(max_share: float, timeout: float) -> dict[str, float]:
    """Wait (up to `timeout` s) until other work uses at most `max_share` of all cores over a 5 s sample: others
    share this machine, and their tests would show up as noise in every figure. Returns what was seen."""
    started = time.monotonic()
    while True:
        meter = CpuMeter()
        time.sleep(5.0)
        meter.phase("sample")
        share = meter.phases["sample"]["other_share_of_machine"]
        waited = time.monotonic() - started
        if share <= max_share or waited >= timeout:
            return {"other_share_at_start": share, "waited_seconds": waited, "quiet": share <= max_share}
        print(f"  machine busy with other work ({100 * share:.0f} % of the cores); waiting", flush=True)


# -- phase 1: the model's ceiling, in process ------------------------------------------------------------------------

def _orders(items: list[Any]) -> dict[str, list[Any]]:
    def by_len(chunk: list[Any]) -> list[Any]:
        return sorted(chunk, key=lambda item: item.token_count)

    windowed = [item for start in range(0, len(items), WINDOW) for item in by_len(items[start:start + WINDOW])]
    return {"arrival": list(items), f"sorted_window{WINDOW}": windowed, "sorted_global": by_len(items)}


async def _pass(backend: Any, items: list[Any], batch_size: int, budget_s: float = 0.0,
                lanes: int = 1) -> dict[str, float]:
    """One pass over `items` in batches of `batch_size`: throughput and padding (padded / real tokens; 1 for a
    backend that runs each text alone). With `budget_s`, the pass stops at the first whole window of WINDOW texts
    after that many seconds (slow passes of badly padded batches need not run to the end; a prefix of whole windows
    of shuffled texts is representative). `lanes` = 1: one batch at a time in this thread (run_batch: the float32
    session spreads it over its intra-op threads). `lanes` > 1: that many `embed` calls at once, each taking the
    next batch in arrival order, as the service's batcher runs a backend whose max_in_flight is above 1 (int8: one
    single-threaded run per lane)."""
    padded = real = done = taken = 0
    started = time.perf_counter()

    def account(batch: list[Any]) -> None:
        nonlocal padded, real, done
        own = sum(i.token_count for i in batch)
        padded += len(batch) * max(i.token_count for i in batch) if backend.pads_batches else own
        real += own
        done += len(batch)

    def next_batch() -> list[Any] | None:
        nonlocal taken
        if taken >= len(items) or (budget_s and taken % WINDOW == 0 and taken
                                   and time.perf_counter() - started > budget_s):
            return None
        batch = items[taken:taken + batch_size]
        taken += len(batch)
        return batch

    if lanes == 1:
        while (batch := next_batch()) is not None:
            backend.run_batch(batch)
            account(batch)
    else:
        async def lane() -> None:
            while (batch := next_batch()) is not None:
                await backend.embed(batch)
                account(batch)

        await asyncio.gather(*(lane() for _ in range(lanes)))
    seconds = time.perf_counter() - started
    return {"texts_per_s": done / seconds, "seconds": seconds, "texts": done, "padding_ratio": padded / real}


def lanes_of(compute: str) -> int:
    """Embed calls the service runs at once for this compute (the backend's own rule: int8 one per usable CPU,
    float32 one), read from a backend that is built but not started (no session is loaded)."""
    from services.embedding.backends.onnx import OnnxBackend
    from services.embedding.config import OnnxConfig

    backend = OnnxBackend(OnnxConfig(compute=compute))
    try:
        return backend.max_in_flight
    finally:
        backend._executor.shutdown(wait=False)


async def open_backend(compute: str, allow_spinning: bool) -> Any:
    from services.embedding.backends.onnx import OnnxBackend
    from services.embedding.config import OnnxConfig

    backend = OnnxBackend(OnnxConfig(compute=compute, allow_spinning=allow_spinning))  # threads as served
    await backend.start()
    return backend


async def measure_ceiling(backend: Any, texts: list[str], warm: list[str], batch_sizes: Sequence[int],
                          budget_s: float) -> dict[str, Any]:
    """The model at its best for its compute: one padded batch at a time over three orders (float32), or
    `max_in_flight` unpadded embed calls at once in arrival order (int8), plus one call at a time at batch 1."""
    items = backend.prepare(texts)
    lanes = backend.max_in_flight
    for size in (1, 8, 64):  # allocations for small and large shapes before timing
        await _pass(backend, backend.prepare(warm[:64]), size, lanes=lanes)
    compute = backend.config.compute
    out: dict[str, Any] = {"compute": compute, "lanes": lanes, "pads_batches": backend.pads_batches,
                           "threads": 1 if lanes > 1 else backend.config.threads,
                           "allow_spinning": backend.config.allow_spinning,
                           "texts": len(items), "real_tokens_mean": sum(i.token_count for i in items) / len(items),
                           "truncated": sum(1 for i in items if i.truncated), "pass_budget_seconds": budget_s,
                           "orders": {}}
    single = await _pass(backend, items, 1, lanes=lanes)  # order is irrelevant at batch size 1: measured in full
    rows_arrival: dict[str, Any] = {}
    print(f"  {compute} batch 1 ({lanes} at once): {single['texts_per_s']:.1f} texts/s", flush=True)
    if lanes > 1:
        out["one_lane_batch1"] = await _pass(backend, items, 1, lanes=1)
        print(f"  {compute} batch 1, one at a time: {out['one_lane_batch1']['texts_per_s']:.1f} texts/s", flush=True)
    orders = _orders(items) if backend.pads_batches else {"arrival": list(items)}
    for order, ordered in orders.items():
        rows = {"1": single}
        for size in batch_sizes:
            if size == 1:
                continue
            if order.startswith("sorted_window") and size >= WINDOW:
                rows[str(size)] = rows_arrival[str(size)]  # a batch = a whole window: the arrival batch itself
                continue
            # A globally sorted prefix would hold only the shortest texts: those passes always run in full.
            rows[str(size)] = await _pass(backend, ordered, size, 0.0 if order == "sorted_global" else budget_s,
                                          lanes=lanes)
            print(f"  {order} batch {size}: {rows[str(size)]['texts_per_s']:.1f} texts/s "
                  f"(padding x{rows[str(size)]['padding_ratio']:.2f}, {rows[str(size)]['texts']} texts)", flush=True)
        if order == "arrival":
            rows_arrival = rows
        best = max(rows, key=lambda k: rows[k]["texts_per_s"])
        out["orders"][order] = {"by_batch_size": rows, "best_batch_size": int(best),
                                "best_texts_per_s": rows[best]["texts_per_s"]}
    return out


async def recheck_ceiling(backend: Any, texts: list[str], ceiling: dict[str, Any]) -> dict[str, Any]:
    """After the sweep: batch 1 and the best arrival-order batch size again (drift check; the higher one counts)."""
    items = backend.prepare(texts)
    best = ceiling["orders"]["arrival"]["best_batch_size"]
    again = {str(size): await _pass(backend, items, size, lanes=ceiling["lanes"]) for size in sorted({1, best})}
    first = ceiling["orders"]["arrival"]["by_batch_size"]
    return {"by_batch_size": again,
            "ceiling_texts_per_s": max(first[str(best)]["texts_per_s"], again[str(best)]["texts_per_s"]),
            "batch1_texts_per_s": max(first["1"]["texts_per_s"], again["1"]["texts_per_s"]),
            "ceiling_batch_size": best, "compute": ceiling["compute"], "lanes": ceiling["lanes"]}


# -- services ---------------------------------------------------------------------------------------------------------

def start_service(workdir: Path, name: str, env: dict[str, str]) -> LocalMesh:
    base = {"RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_REDIS_URL": "", "RAGFLEET_EMBEDDING_L1_MAX_MB": "0"}
    mesh = LocalMesh(data_dir=workdir / name, env={**base, **env})
    mesh.start(["embedding"])
    return mesh


class FloorServer:
    """bench/_embedding_floor.py as a process: a bare grpc.aio Embed (no interceptors, auth, metrics, tracing, cache
    or batcher) doing the service's model work (its OnnxBackend, built from the same environment as the services of
    the sweep). Its CPU is read from /proc, as it has no metrics port."""

    def __init__(self, workdir: Path, env: dict[str, str], timeout: float = 120.0) -> None:
        from services.runtime.workers import die_with_parent

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "bare-floor.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "bench._embedding_floor", str(self.port)], cwd=ROOT,
                                        env={**os.environ, **env, **die_with_parent()}, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """It listens only once its model is loaded and warmed: a ready channel means ready to embed."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"bare floor exited with code {self.process.returncode} during start-up:\n"
                                       + self.log_path.read_text(errors="replace")[-2000:])
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"bare floor not listening after {timeout:.0f}s") from None

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def floor_view(cpu_before: float, cpu_after: float, texts: int, wall: float) -> dict[str, Any]:
    """The bare floor's row in the service columns: one model run per text (no batcher), its process CPU from /proc;
    no metrics, so no model busy share."""
    return {"batches": float(texts), "mean_batch_size": 1.0, "padded_tokens": None, "model_busy_share": None,
            "mean_queue_wait_ms": None, "overloaded": 0.0,
            "service_cpu_cores": (cpu_after - cpu_before) / wall if wall else 0.0}


def scrape(mesh: LocalMesh) -> dict[str, float]:
    """The embedding service's own counters (sums and counts of its histograms), from its metrics port."""
    url = f"http://127.0.0.1:{mesh.metrics_ports['embedding']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    wanted = ("ragfleet_embedding_batch_size_sum", "ragfleet_embedding_batch_size_count",
              "ragfleet_embedding_batch_tokens_sum", "ragfleet_embedding_model_seconds_sum",
              "ragfleet_embedding_queue_wait_seconds_sum", "ragfleet_embedding_queue_wait_seconds_count",
              "ragfleet_embedding_overloaded_total", "process_cpu_seconds_total")
    out = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in out:
            out[name] = float(value)
    return out


def service_view(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in before}
    batches = d["ragfleet_embedding_batch_size_count"] or 1.0
    return {"batches": d["ragfleet_embedding_batch_size_count"],
            "mean_batch_size": d["ragfleet_embedding_batch_size_sum"] / batches,
            "padded_tokens": d["ragfleet_embedding_batch_tokens_sum"],
            "model_busy_share": d["ragfleet_embedding_model_seconds_sum"] / wall if wall else 0.0,
            "mean_queue_wait_ms": 1000 * d["ragfleet_embedding_queue_wait_seconds_sum"]
            / (d["ragfleet_embedding_queue_wait_seconds_count"] or 1.0),
            "overloaded": d["ragfleet_embedding_overloaded_total"],
            # The whole service process (event loop, gRPC threads, model threads), in cores.
            "service_cpu_cores": d["process_cpu_seconds_total"] / wall if wall else 0.0}


# -- load generation --------------------------------------------------------------------------------------------------

async def embed_one(stub: Any, text: str) -> tuple[float, embedding_pb2.EmbedResponse]:
    started = time.perf_counter()
    reply = await stub.Embed(embedding_pb2.EmbedRequest(texts=[text], input_type=QUERY), timeout=RPC_TIMEOUT)
    elapsed = (time.perf_counter() - started) * 1000
    if len(reply.embeddings) != 1 or len(reply.embeddings[0].values) != reply.dimension:
        raise RuntimeError(f"bad reply: {len(reply.embeddings)} embeddings of dimension {reply.dimension}")
    return elapsed, reply


async def drive(stub: Any, texts: Sequence[str], callers: int, seconds: float | None = None) -> dict[str, Any]:
    """`callers` closed-loop callers share the texts (each sent once, one per call) until all are done, or no new
    call starts after `seconds`."""
    latencies: list[float] = []
    codes: Counter = Counter()
    cursor = 0
    stop = None if seconds is None else time.monotonic() + seconds

    async def caller() -> None:
        nonlocal cursor
        while cursor < len(texts) and (stop is None or time.monotonic() < stop):
            text = texts[cursor]
            cursor += 1
            try:
                ms, _ = await embed_one(stub, text)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                continue
            latencies.append(ms)
            codes["OK"] += 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall = time.perf_counter() - started
    return {"callers": callers, "texts": len(texts), "wall_seconds": wall, "texts_per_s": codes["OK"] / wall,
            "latency_ms": percentiles(latencies), "codes": dict(codes),
            "loadgen_cpu_cores": (time.process_time() - cpu) / wall}


async def drive_paired(stubs: dict[str, Any], texts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One caller, alternating between the services text by text (random order per pair): both see the same texts
    under the same machine noise, so the p99 difference is about the services, not about when they ran."""
    rng = random.Random(SEED)
    latencies: dict[str, list[float]] = {name: [] for name in stubs}
    names = list(stubs)
    for text in texts:
        rng.shuffle(names)
        for name in names:
            ms, _ = await embed_one(stubs[name], text)
            latencies[name].append(ms)
    return {name: {"callers": 1, "texts": len(texts), "wall_seconds": sum(values) / 1000, "latencies_ms": values,
                   "texts_per_s": len(values) / (sum(values) / 1000), "latency_ms": percentiles(values),
                   "codes": {"OK": len(values)}, "paired": True}
            for name, values in latencies.items()}


async def warm_up(stub: Any, texts: Sequence[str], callers: int) -> None:
    """Same caller count as the setting that follows, on texts that are not measured: allocations for the batch
    shapes this load produces, and the batcher's burst signal in the state this load keeps it in."""
    await drive(stub, texts[:max(24, min(len(texts), 2 * callers))], callers)


async def sweep(meshes: dict[str, LocalMesh], texts: Sequence[str], warm: Sequence[str], callers: Sequence[int],
                sim: SimProcess | None = None, floor: FloorServer | None = None) -> dict[str, dict[str, Any]]:
    """The N sweep against each service ("batched", "unbatched") and, with `floor`, the bare floor server
    ("bare_floor"), interleaved: N = 1 paired (calls alternate between all of them text by text), larger N one at a
    time in turn, each after its own warm-up. With `sim`, each setting also records the endpoint's own count of HTTP
    calls."""
    names = [*meshes, *([FLOOR] if floor is not None else [])]
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    channels = {name: mesh.internal_channel("embedding", aio=True) for name, mesh in meshes.items()}
    if floor is not None:
        channels[FLOOR] = floor.channel()

    def snapshot(name: str) -> Any:
        return floor.cpu_seconds() if name == FLOOR else scrape(meshes[name])  # type: ignore[union-attr]

    try:
        stubs = {name: embedding_pb2_grpc.EmbeddingServiceStub(ch) for name, ch in channels.items()}
        for n in callers:
            groups = [names] if n == 1 else [[name] for name in names]
            for group in groups:
                for name in group:
                    await warm_up(stubs[name], warm, n)
                before = {name: snapshot(name) for name in group}
                if sim is not None:
                    sim.control("/_sim/reset", {})
                if n == 1:
                    rows = await drive_paired({name: stubs[name] for name in group}, texts)
                else:
                    rows = {group[0]: await drive(stubs[group[0]], texts, n)}
                stats = sim.control("/_sim/stats") if sim is not None else None
                for name, row in rows.items():
                    row.pop("latencies_ms", None)
                    if name == FLOOR:
                        row["service"] = floor_view(before[name], snapshot(name), row["codes"].get("OK", 0),
                                                    row["wall_seconds"])
                    else:
                        row["service"] = service_view(before[name], scrape(meshes[name]), row["wall_seconds"])
                    if stats is not None:
                        # Paired runs share the sim: its counters cover both services then.
                        row["sim"] = {k: stats[k] for k in ("embedding_requests", "embedding_inputs",
                                                            "max_embedding_batch")} | {"services": len(group)}
                    results[name][str(n)] = row
            for name in names:
                row = results[name][str(n)]
                lat = row["latency_ms"]
                print(f"  {name:10s} N={n:3d}: {row['texts_per_s']:7.1f} texts/s  p50 {lat['p50']:8.1f}  "
                      f"p95 {lat['p95']:8.1f}  p99 {lat['p99']:8.1f} ms  batches {row['service']['batches']:.0f} "
                      f"(mean {row['service']['mean_batch_size']:.1f})  service CPU "
                      f"{row['service']['service_cpu_cores']:.2f} cores  {row['codes']}", flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return results


# -- phase 3: cache hit vs miss ---------------------------------------------------------------------------------------

async def measure_cache(mesh_a: LocalMesh, mesh_b: LocalMesh, texts: Sequence[str],
                        warm: Sequence[str]) -> dict[str, Any]:
    series: dict[str, list[float]] = {"miss": [], "l1_hit": [], "l2_hit": [], "l2_promoted_l1_hit": [],
                                      "grpc_health_check": []}
    wrong_flag = 0
    async with mesh_a.internal_channel("embedding", aio=True) as ch_a, \
            mesh_b.internal_channel("embedding", aio=True) as ch_b:
        a, b = embedding_pb2_grpc.EmbeddingServiceStub(ch_a), embedding_pb2_grpc.EmbeddingServiceStub(ch_b)
        for text in warm[:24]:  # connections, model allocations, Redis pool on both replicas
            for stub in (a, b, a, b):
                await embed_one(stub, text)
        health = health_pb2_grpc.HealthStub(ch_a)
        for text in texts:
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
            series["grpc_health_check"].append((time.perf_counter() - started) * 1000)
            for key, stub, expect_cached in (("miss", a, False), ("l1_hit", a, True), ("l2_hit", b, True),
                                             ("l2_promoted_l1_hit", b, True)):
                ms, reply = await embed_one(stub, text)
                wrong_flag += reply.embeddings[0].cached != expect_cached
                series[key].append(ms)
        # The most Embed RPCs this service and this load generator can do at all: 64 callers, every text an L1
        # hit, so no model and no HTTP. No backend can beat it through gRPC on this machine.
        before = scrape(mesh_a)
        capacity = await drive(a, list(texts) * max(1, 2000 // len(texts)), 64)
        capacity["service"] = service_view(before, scrape(mesh_a), capacity["wall_seconds"])
    out: dict[str, Any] = {name: percentiles(values) for name, values in series.items()}
    out["rpc_capacity_64_callers"] = capacity
    out["unexpected_cached_flags"] = wrong_flag
    out["texts"] = len(texts)
    for level in ("l1_hit", "l2_hit"):
        out[f"{level}_speedup_p50"] = out["miss"]["p50"] / out[level]["p50"]
        out[f"{level}_faster_pct_p50"] = 100 * (1 - out[level]["p50"] / out["miss"]["p50"])
    out["raw_ms"] = series
    return out


def cleanup_redis(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


# -- phase 5: batching policies side by side (issue 14) ----------------------------------------------------------------

QUERIES = SCIFACT.with_name("queries.jsonl")
# The default, the default with a fixed window (before the share), and pure length grouping.
POLICIES = {"bounded": {}, "bounded-fixed": {"RAGFLEET_EMBEDDING_REORDER_WINDOW_SHARE": "0"},
            "length": {"RAGFLEET_EMBEDDING_BATCH_POLICY": "length"}}
POLICY_CALLERS = (1, 8, 64)
SENTENCE_MIX_CALLERS = (64,)  # phase 2's mix (85 % sentences), where length grouping pays most
FLOOR_CALLERS = 8
QUERY_SHARE = 0.5
CHUNK_WORDS = (120, 190)  # a chunk: whole sentences of one abstract, 120-190 words (~180-256 model tokens)


class MixedPool:
    """Short queries (SciFact claims, 12-38 tokens) and ~256-token chunks (whole sentences of one abstract up to
    CHUNK_WORDS[1] words, the model cuts at 256 tokens), QUERY_SHARE of each draw queries, in a seeded order."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._queries = [" ".join(json.loads(line)["text"].split())
                         for line in QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
        chunks = []
        for line in SCIFACT.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            chunk: list[str] = []
            for sentence in _SENTENCE_SPLIT.split(" ".join(json.loads(line)["text"].split())):
                if len(chunk) + len(sentence.split()) > CHUNK_WORDS[1]:
                    break
                chunk += sentence.split()
            if len(chunk) >= CHUNK_WORDS[0]:
                chunks.append(" ".join(chunk))
        self._chunks = chunks
        self._rng.shuffle(self._queries)
        self._rng.shuffle(self._chunks)
        self._next_query = self._next_chunk = 0

    def draw(self, count: int) -> list[str]:
        """The next `count` texts, round-robin through each list (no text twice in one draw; L1 is off and there is
        no Redis, so a text seen in an earlier draw costs the model the same again)."""
        n_queries = round(count * QUERY_SHARE)
        texts = [self._queries[(self._next_query + i) % len(self._queries)] for i in range(n_queries)]
        texts += [self._chunks[(self._next_chunk + i) % len(self._chunks)] for i in range(count - n_queries)]
        self._next_query += n_queries
        self._next_chunk += count - n_queries
        self._rng.shuffle(texts)
        return texts


async def drive_steady(stub: Any, texts: Sequence[str], callers: int) -> dict[str, Any]:
    """Like `drive`, but the latency percentiles leave out the first and last `callers` calls started (all callers
    arriving at once, and the drain when the texts run out, are not the steady state the tail target is about)."""
    done: list[tuple[int, float]] = []
    codes: Counter = Counter()
    cursor = 0

    async def caller() -> None:
        nonlocal cursor
        while cursor < len(texts):
            index, cursor = cursor, cursor + 1
            try:
                ms, _ = await embed_one(stub, texts[index])
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                continue
            done.append((index, ms))
            codes["OK"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall = time.perf_counter() - started
    trim = callers if callers > 1 else 0
    steady = [ms for index, ms in done if trim <= index < len(texts) - trim]
    return {"callers": callers, "texts": len(texts), "wall_seconds": wall, "texts_per_s": codes["OK"] / wall,
            "steady_latencies_ms": steady, "codes": dict(codes)}


def _policy_row(blocks: list[dict[str, Any]], views: list[dict[str, float]]) -> dict[str, Any]:
    latencies = [ms for b in blocks for ms in b["steady_latencies_ms"]]
    lat = percentiles(latencies)
    wall = sum(b["wall_seconds"] for b in blocks)
    ok = sum(b["codes"].get("OK", 0) for b in blocks)
    codes: Counter = Counter()
    for b in blocks:
        codes.update(b["codes"])
    batches = sum(v["batches"] for v in views)
    return {"texts_per_s": ok / wall, "wall_seconds": wall, "latency_ms": lat, "p99_over_p50": lat["p99"] / lat["p50"],
            "codes": dict(codes), "blocks": len(blocks),
            "block_texts_per_s": [b["texts_per_s"] for b in blocks],
            "mean_batch_size": sum(v["mean_batch_size"] * v["batches"] for v in views) / (batches or 1),
            "padded_tokens": sum(v["padded_tokens"] for v in views),
            "mean_queue_wait_ms": sum(v["mean_queue_wait_ms"] * v["batches"] for v in views) / (batches or 1),
            "max_oldest_wait_ms": max((v.get("max_oldest_wait_ms", 0.0) for v in views), default=0.0)}


def arrival_order_floor(costs_ms: Sequence[float], callers: int, servers: int = 1,
                        texts: int = 20000) -> dict[str, float]:
    """p50/p99 that `callers` closed-loop callers would see if each text cost exactly its measured unloaded latency
    and `servers` texts ran at a time (the backend's max_in_flight: 1 for float32, one per CPU for int8), served in
    arrival order, drawing texts from `costs_ms` (seeded): the spread the texts' own costs leave with no batching,
    no overhead and no reordering."""
    rng = random.Random(SEED)
    free_at, latencies = [0.0] * servers, []
    arrivals = [0.0] * callers
    for i in range(texts):
        caller = min(range(callers), key=arrivals.__getitem__)  # the next request to arrive is served next
        server = min(range(servers), key=free_at.__getitem__)  # by the first server free
        start = max(free_at[server], arrivals[caller])
        free_at[server] = start + rng.choice(costs_ms)
        if i >= 10 * callers:
            latencies.append(free_at[server] - arrivals[caller])
        arrivals[caller] = free_at[server]
    lat = percentiles(latencies)
    return {"callers": callers, "servers": servers, "p50": lat["p50"], "p99": lat["p99"],
            "p99_over_p50": lat["p99"] / lat["p50"]}


async def policy_sweep(meshes: dict[str, LocalMesh], pool: Any, rounds: int, block_texts: int,
                       paired_texts: int, callers: Sequence[int] = POLICY_CALLERS) -> dict[str, Any]:
    """Both policies under the same load, interleaved so machine noise hits both alike: at 1 caller text by text
    (paired), at 8 and 64 callers in blocks in ABBA order (A B, B A, ...), each block of a round on the same texts."""
    channels = {name: mesh.internal_channel("embedding", aio=True) for name, mesh in meshes.items()}
    stubs = {name: embedding_pb2_grpc.EmbeddingServiceStub(ch) for name, ch in channels.items()}
    out: dict[str, Any] = {name: {} for name in meshes}
    try:
        for n in callers:
            for name in meshes:
                await warm_up(stubs[name], pool.draw(max(64, 2 * n)), n)
            if n == 1:
                texts = pool.draw(paired_texts)
                before = {name: scrape(meshes[name]) for name in meshes}
                rows = await drive_paired(stubs, texts)
                for name, row in rows.items():
                    out[name]["unloaded_ms"] = row.pop("latencies_ms")
                    view = service_view(before[name], scrape(meshes[name]), row["wall_seconds"])
                    lat = row["latency_ms"]
                    out[name]["1"] = _policy_row([{"wall_seconds": row["wall_seconds"], "codes": row["codes"],
                                                   "texts_per_s": row["texts_per_s"], "steady_latencies_ms": []}],
                                                 [view]) | {"latency_ms": lat, "p99_over_p50": lat["p99"] / lat["p50"],
                                                            "paired": True}
            else:
                blocks: dict[str, list[dict[str, Any]]] = {name: [] for name in meshes}
                views: dict[str, list[dict[str, float]]] = {name: [] for name in meshes}
                for r in range(rounds):
                    texts = pool.draw(block_texts)  # the same texts for both policies in a round
                    order = list(meshes) if r % 2 == 0 else list(reversed(meshes))  # ABC, CBA, ...
                    for name in order:
                        before = scrape(meshes[name])
                        sampler = OldestWaitSampler(meshes[name])
                        sampler.start()
                        block = await drive_steady(stubs[name], texts, n)
                        view = service_view(before, scrape(meshes[name]), block["wall_seconds"])
                        view["max_oldest_wait_ms"] = await sampler.stop()
                        blocks[name].append(block)
                        views[name].append(view)
                for name in meshes:
                    out[name][str(n)] = _policy_row(blocks[name], views[name])
            for name in meshes:
                row = out[name][str(n)]
                lat = row["latency_ms"]
                print(f"  {name:8s} N={n:3d}: {row['texts_per_s']:6.1f} texts/s  p50 {lat['p50']:7.1f}  "
                      f"p95 {lat['p95']:7.1f}  p99 {lat['p99']:7.1f} ms  p99/p50 {row['p99_over_p50']:.2f}  "
                      f"mean batch {row['mean_batch_size']:.1f}  {row['codes']}", flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return out


class OldestWaitSampler:
    """Polls the service's oldest-waiting-text gauge every 100 ms while a block runs; keeps the highest value."""

    def __init__(self, mesh: LocalMesh) -> None:
        self._url = f"http://127.0.0.1:{mesh.metrics_ports['embedding']}/metrics"
        self._task: asyncio.Task | None = None
        self.peak = 0.0

    def _read(self) -> float:
        with urllib.request.urlopen(self._url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("ragfleet_embedding_oldest_wait_seconds "):
                    return float(line.split()[1])
        return 0.0

    async def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, await asyncio.to_thread(self._read))
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return 1000 * self.peak


def policy_targets(by_compute: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets once per compute of phase 5, each row naming its compute."""
    out = []
    for compute, policies in by_compute.items():
        new, old = policies["bounded"], policies["length"]
        r64, r8 = new["64"]["p99_over_p50"], new["8"]["p99_over_p50"]
        tput = new["64"]["texts_per_s"] / old["64"]["texts_per_s"]
        mix = policies["sentence_mix"]
        tput2 = mix["bounded"]["64"]["texts_per_s"] / mix["length"]["64"]["texts_per_s"]
        floor = new["arrival_order_floor"]
        at_once = f", {floor['servers']} at a time" if floor["servers"] > 1 else ""
        out += [target(f"policy bounded, {compute}: 64 callers p99 / p50", r64, "<= 1.5", r64 <= 1.5),
                target(f"policy bounded, {compute}: 64 callers throughput / pure length grouping", tput, ">= 0.95",
                       tput >= 0.95),
                target(f"policy bounded, {compute}: 64 callers throughput / pure length grouping, phase 2's mix",
                       tput2, ">= 0.95", tput2 >= 0.95),
                target(f"policy bounded, {compute}: 8 callers p99 / p50", r8, "<= 1.5", r8 <= 1.5),
                target(f"  floor, {compute}: 8 callers p99 / p50 in arrival order at the 1-caller costs{at_once}",
                       floor["p99_over_p50"], "<= 1.5", floor["p99_over_p50"] <= 1.5)]
    return out


def policy_rows(policies: dict[str, Any], callers: Sequence[int] = POLICY_CALLERS) -> list[str]:
    lines = ["| callers | policy | texts/s | p50 ms | p95 ms | p99 ms | p99/p50 | mean batch | mean queue wait ms | "
             "peak oldest wait ms | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in callers:
        for name in POLICIES:
            r = policies[name][str(n)]
            lat = r["latency_ms"]
            errors = sum(v for k, v in r["codes"].items() if k != "OK")
            peak = f"{r['max_oldest_wait_ms']:.0f}" if n > 1 else ""
            lines.append(f"| {n} | {name} | {r['texts_per_s']:.1f} | {lat['p50']:.1f} | {lat['p95']:.1f} | "
                         f"{lat['p99']:.1f} | {r['p99_over_p50']:.2f} | {r['mean_batch_size']:.1f} | "
                         f"{r['mean_queue_wait_ms']:.1f} | {peak} | {errors} |")
    return lines


# -- report -----------------------------------------------------------------------------------------------------------

def _sweep_rows(sweep_result: dict[str, dict[str, Any]], callers: Sequence[int],
                real_tokens: float | None = None) -> list[str]:
    """One row per (callers, mode). `real_tokens` (the texts' own tokens) adds the padding column (local model)."""
    pad = real_tokens is not None
    lines = ["| callers | mode | texts/s | p50 ms | p95 ms | p99 ms | mean batch | " + ("padding | " if pad else "")
             + "backend busy | service CPU | errors |", "|---|---|---|---|---|---|---|" + ("---|" if pad else "")
             + "---|---|---|"]
    for n in callers:
        for mode in sweep_result:
            r = sweep_result[mode][str(n)]
            lat, svc = r["latency_ms"], r["service"]
            errors = sum(v for k, v in r["codes"].items() if k != "OK")
            # The bare floor has no metrics: one model run per text (batch 1, nothing padded), busy share unknown.
            padding = ("" if not real_tokens else "x1.00 | " if svc["padded_tokens"] is None
                       else f"x{svc['padded_tokens'] / real_tokens:.2f} | ")
            busy = "-" if svc["model_busy_share"] is None else f"{100 * svc['model_busy_share']:.0f} %"
            lines.append(f"| {n} | {MODE_LABELS.get(mode, mode)} | {r['texts_per_s']:.1f} | {lat['p50']:.1f} | "
                         f"{lat['p95']:.1f} | {lat['p99']:.1f} | {svc['mean_batch_size']:.1f} | {padding}{busy} | "
                         f"{svc['service_cpu_cores']:.2f} cores | {errors} |")
    return lines


def report(figures: dict[str, Any], callers: Sequence[int]) -> tuple[list[dict[str, Any]], str]:
    ceiling = figures["ceiling"]
    recheck = figures["ceiling_recheck"]
    local, remote, cache = figures["local"], figures["remote"], figures["cache"]
    capacity = cache["rpc_capacity_64_callers"]
    top = str(64 if 64 in callers else max(callers))
    ceiling_tps, batch1_tps = recheck["ceiling_texts_per_s"], recheck["batch1_texts_per_s"]
    local64 = local["batched"][top]["texts_per_s"]
    remote_top, remote_base = remote["batched"][top]["texts_per_s"], remote["unbatched"][top]["texts_per_s"]
    remote_ratio = remote_top / remote_base
    local_p99 = local["batched"]["1"]["latency_ms"]["p99"] - local["unbatched"]["1"]["latency_ms"]["p99"]
    remote_p99 = remote["batched"]["1"]["latency_ms"]["p99"] - remote["unbatched"]["1"]["latency_ms"]["p99"]
    compute, lanes = ceiling["compute"], ceiling["lanes"]
    how = (f"{lanes} single-threaded runs at once" if lanes > 1
           else f"one batch at a time on {ceiling['threads']} intra-op threads")
    ceiling_target = target(f"local: {top} callers / ceiling ({compute}, {ceiling_tps:.1f} texts/s)",
                            local64 / ceiling_tps, ">= 0.95", local64 / ceiling_tps >= 0.95)
    ceiling_target["floor"] = (f"in-process ceiling {ceiling_tps:.1f} texts/s ({compute}: {how}, batch "
                               f"{recheck['ceiling_batch_size']})")
    floor_targets = []
    if FLOOR in local:
        floor64 = local[FLOOR][top]["texts_per_s"]
        ceiling_target["floor"] += (f"; bare gRPC+model floor {floor64:.1f} texts/s = {floor64 / ceiling_tps:.3f} of "
                                    f"it, the service {local64 / floor64:.3f} of the floor")
        floor_targets = [
            target(f"local: {top} callers, bare gRPC+model floor / ceiling (same run; {floor64:.1f} texts/s)",
                   floor64 / ceiling_tps, "informational (>= 0.95)",
                   floor64 / ceiling_tps >= 0.95),
            target(f"local: {top} callers, service batched / bare gRPC+model floor", local64 / floor64, ">= 0.95",
                   local64 / floor64 >= 0.95),
        ]
    targets = [
        ceiling_target,
        *floor_targets,
        target(f"local: {top} callers / in-process batch-1 ({compute}, {batch1_tps:.1f} texts/s)",
               local64 / batch1_tps, "> 1", local64 / batch1_tps > 1),
        target(f"remote: {top} callers batched / unbatched throughput", remote_ratio, ">= 8", remote_ratio >= 8),
        target("local: 1 caller p99 batched - unbatched (ms)", local_p99, "<= 3", local_p99 <= 3),
        target("remote: 1 caller p99 batched - unbatched (ms)", remote_p99, "<= 3", remote_p99 <= 3),
        target("gRPC cache: miss p50 / L1 hit p50", cache["l1_hit_speedup_p50"], ">= 20",
               cache["l1_hit_speedup_p50"] >= 20),
    ] + policy_targets(figures["policies"])
    lines = [f"## Local ONNX backend through gRPC, compute {compute} ({local['batched'][top]['texts']} texts per "
             "setting, one text per call)", ""]
    lines += _sweep_rows(local, callers, ceiling["real_tokens_mean"] * ceiling["texts"] if ceiling["pads_batches"]
                         else None)
    if not ceiling["pads_batches"]:
        lines += ["", f"{compute} pads nothing (each text runs alone), so there is no padding column; backend busy = "
                  f"model time summed over the batches in flight (up to {lanes} at once: {100 * lanes} %)."]
    orders = ceiling["orders"]
    sorted_bests = "".join(
        f", {100 * local64 / orders[o]['best_texts_per_s']:.0f} % of the {label} best"
        for o, label in ((f"sorted_window{WINDOW}", "window-sorted"), ("sorted_global", "globally sorted"))
        if o in orders)
    lines += ["", f"{top} callers, batched: {local64:.1f} texts/s = {100 * local64 / ceiling_tps:.0f} % of the "
              f"arrival-order ceiling{sorted_bests}; {local64 / batch1_tps:.2f}x in-process batch 1."]
    if FLOOR in local:
        lines += ["", "Bare floor = bench/_embedding_floor.py: a bare grpc.aio server (no interceptors, auth, "
                  "metrics, tracing, validation, cache or batcher) doing the service's model work, i.e. the same "
                  f"tokenizer and OnnxBackend ({compute}, up to {lanes} texts at once) from the same environment, on "
                  "the same event loop; driven by the same callers, interleaved with the two services. What it "
                  "loses to the ceiling is Python gRPC's and the load generator's share of the same cores; what the "
                  "service loses to it is the service's own. " + "; ".join(
                      f"{n} callers: floor {local[FLOOR][str(n)]['texts_per_s']:.1f} texts/s = "
                      f"{100 * local[FLOOR][str(n)]['texts_per_s'] / ceiling_tps:.0f} % of the ceiling, batched "
                      f"{100 * local['batched'][str(n)]['texts_per_s'] / local[FLOOR][str(n)]['texts_per_s']:.0f} % "
                      f"of the floor, unbatched "
                      f"{100 * local['unbatched'][str(n)]['texts_per_s'] / local[FLOOR][str(n)]['texts_per_s']:.0f} %"
                      for n in callers if n > 1) + "."]
    lines += ["",
              f"## Ceiling: ONNX backend in process, compute {compute} ({ceiling['texts']} texts, mean "
              f"{ceiling['real_tokens_mean']:.0f} real tokens, {ceiling['truncated']} truncated at 256; {how})", "",
              "texts/s by batch size (padded / real tokens in brackets; * = pass stopped after "
              f"{ceiling['pass_budget_seconds']:.0f} s at a whole window of {WINDOW} texts)"
              + (f"; {lanes} embed calls at once, each taking the next batch in arrival order, as the service runs "
                 f"them; only arrival order: with nothing padded, sorting by length changes nothing"
                 if lanes > 1 else ""), "",
              "| batch size | " + " | ".join(orders) + " |", "|---|" + "---|" * len(orders)]
    for size in orders["arrival"]["by_batch_size"]:
        cells = [f"{orders[o]['by_batch_size'][size]['texts_per_s']:.1f} "
                 f"(x{orders[o]['by_batch_size'][size]['padding_ratio']:.2f})"
                 + ("*" if orders[o]["by_batch_size"][size]["texts"] < ceiling["texts"] else "") for o in orders]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    again = recheck["by_batch_size"]
    lines += ["", "Re-measured after the sweep (drift check): " + ", ".join(
        f"batch {k}: {v['texts_per_s']:.1f} texts/s" for k, v in again.items())
        + f". Ceiling used: {ceiling_tps:.1f} texts/s (arrival order, batch {recheck['ceiling_batch_size']}, the "
          f"higher of the two passes); batch-1: {batch1_tps:.1f} texts/s. " + (
            f"onnxruntime threads may spin here (the model's best alone); with spinning off, as the service runs "
            f"it, batch 1 gave {figures['batch1_as_served']['texts_per_s']:.1f} texts/s." if lanes == 1 else
            f"The session runs as the service runs it (one intra-op thread, so spinning changes nothing); one call "
            f"at a time, batch 1 gave {ceiling['one_lane_batch1']['texts_per_s']:.1f} texts/s "
            f"(the ceiling is {ceiling_tps / ceiling['one_lane_batch1']['texts_per_s']:.2f}x that)."), "",
        f"## Remote backend (sim LLM: {SIM_CALL_MS:.0f} ms per HTTP call + {SIM_PER_TEXT_MS} ms per text, "
        f"{remote['batched'][top]['texts']} texts per setting)", ""]
    lines += _sweep_rows(remote, callers)
    lines += ["", "Model batches = HTTP calls per setting, from the service's batch counter (in brackets the sim's own "
              "count of calls; at 1 caller the two services share the sim, so it covers both): " + ", ".join(
                  f"{mode} N={n}: {remote[mode][str(n)]['service']['batches']:.0f} "
                  f"({remote[mode][str(n)]['sim']['embedding_requests']})"
                  for mode in ("batched", "unbatched") for n in callers), "",
        f"gRPC capacity on this machine: {capacity['texts_per_s']:.0f} cached Embed RPCs/s at 64 callers (every "
        f"text an L1 hit: no model, no HTTP; service CPU {capacity['service']['service_cpu_cores']:.2f} cores). "
        f"Remote batched at {top} callers reached {100 * remote_top / capacity['texts_per_s']:.0f} % of it; "
        f"{8 * remote_base:.0f} texts/s (8x unbatched) would be {100 * 8 * remote_base / capacity['texts_per_s']:.0f} "
        "%.", "", *policies_markdown(figures["policies"]), "",
        f"## Cache hit vs miss through gRPC (one caller, {cache['texts']} texts; L1 + Redis L2, two replicas)", "",
        "| path | p50 ms | p95 ms | p99 ms | p50 speed-up vs miss |", "|---|---|---|---|---|"]
    for key, label in (("miss", "miss (model)"), ("l1_hit", "L1 hit (same replica)"),
                       ("l2_hit", "L2 hit (other replica, Redis)"), ("l2_promoted_l1_hit", "promoted L1 hit"),
                       ("grpc_health_check", "floor: gRPC health check")):
        s = cache[key]
        speed = f"{cache['miss']['p50'] / s['p50']:.1f}x" if key != "miss" else ""
        lines.append(f"| {label} | {s['p50']:.3f} | {s['p95']:.3f} | {s['p99']:.3f} | {speed} |")
    lines += ["", f"L1 hit {cache['l1_hit_faster_pct_p50']:.1f} % faster than a miss at p50, L2 hit "
              f"{cache['l2_hit_faster_pct_p50']:.1f} %; replies with an unexpected `cached` flag: "
              f"{cache['unexpected_cached_flags']}."]
    return targets, "\n".join(lines)


def plot(figures: dict[str, Any], callers: Sequence[int]):  # type: ignore[no-untyped-def]
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 2, figsize=(13, 13))
        recheck, orders = figures["ceiling_recheck"], figures["ceiling"]["orders"]
        for ax, backend, title in ((axes[0][0], "local", f"local ONNX ({recheck['compute']}) through gRPC"),
                                   (axes[0][1], "remote", "remote (sim 10 ms/call) through gRPC")):
            for mode, style in (("batched", "o-"), ("unbatched", "s--"), (FLOOR, "^:")):
                if mode in figures[backend]:
                    ax.plot(callers, [figures[backend][mode][str(n)]["texts_per_s"] for n in callers], style,
                            label=MODE_LABELS[mode] + (" (bare gRPC + the model)" if mode == FLOOR else ""))
            if backend == "local":
                ax.axhline(recheck["ceiling_texts_per_s"], color="red", lw=1,
                           label=f"ceiling ({recheck['compute']}, {recheck['lanes']} at once, arrival order, batch "
                                 f"{recheck['ceiling_batch_size']})")
                ax.axhline(0.95 * recheck["ceiling_texts_per_s"], color="red", lw=0.8, ls=":",
                           label="95 % of ceiling (issue 12)")
                if "sorted_global" in orders:
                    ax.axhline(orders["sorted_global"]["best_texts_per_s"], color="grey", lw=0.8, ls="-.",
                               label="globally length-sorted best")
            else:
                top = str(64 if 64 in callers else max(callers))
                ax.axhline(8 * figures["remote"]["unbatched"][top]["texts_per_s"], color="red", lw=0.8, ls=":",
                           label=f"8x unbatched at {top} callers (target)")
                ax.axhline(figures["cache"]["rpc_capacity_64_callers"]["texts_per_s"], color="grey", lw=0.8,
                           ls="-.", label="gRPC capacity (cached RPCs, 64 callers)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(callers), [str(n) for n in callers])
            ax.set(title=title, xlabel="concurrent single-text callers", ylabel="texts/s")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        ax = axes[1][0]
        for order, rows in orders.items():
            sizes = [int(k) for k in rows["by_batch_size"]]
            ax.plot(sizes, [rows["by_batch_size"][str(s)]["texts_per_s"] for s in sizes], "o-", label=order)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set(title=f"ONNX in process ({recheck['compute']}, {recheck['lanes']} at once): throughput by batch size",
               xlabel="batch size", ylabel="texts/s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax = axes[1][1]
        for backend, color in (("local", "tab:blue"), ("remote", "tab:orange")):
            for mode, style in (("batched", "o-"), ("unbatched", "s--"), (FLOOR, "^:")):
                if mode in figures[backend]:
                    ax.plot(callers, [figures[backend][mode][str(n)]["latency_ms"]["p99"] for n in callers], style,
                            color=color, label=f"{backend} {MODE_LABELS[mode]} p99")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(callers), [str(n) for n in callers])
        ax.set(title="p99 latency by callers", xlabel="concurrent single-text callers", ylabel="ms")
        ax.legend(fontsize=8)
        by_compute = figures["policies"]
        for ax, key, title, ylabel in ((axes[2][0], "p99_over_p50", "policies: p99 / p50 (queries + chunks)",
                                        "p99 / p50"),
                                       (axes[2][1], "texts_per_s", "policies: throughput (queries + chunks)",
                                        "texts/s")):
            for compute, style in zip(by_compute, ("-", "--", ":")):
                policies = by_compute[compute]
                for name, (marker, color) in (("bounded", ("o", "tab:blue")), ("bounded-fixed", ("^", "tab:green")),
                                              ("length", ("s", "tab:orange"))):
                    ax.plot(POLICY_CALLERS, [policies[name][str(n)][key] for n in POLICY_CALLERS], marker + style,
                            color=color, label=f"{name}, {compute}")
            if key == "p99_over_p50":
                ax.axhline(1.5, color="red", lw=0.8, ls=":", label="target 1.5 (8 and 64 callers)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(POLICY_CALLERS), [str(n) for n in POLICY_CALLERS])
            ax.set(title=title, xlabel="concurrent single-text callers", ylabel=ylabel)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90)

    return draw


# -- main -------------------------------------------------------------------------------------------------------------

def service_defaults() -> dict[str, Any]:
    """The embedding service's batcher and openai defaults, as this checkout defines them (the sweeps use them)."""
    from dataclasses import asdict

    from services.embedding.config import BatcherConfig, OnnxConfig, OpenAIConfig

    openai, onnx = OpenAIConfig(), OnnxConfig()
    return {"batcher": asdict(BatcherConfig()), "openai_max_batch_size": openai.max_batch_size,
            "openai_max_in_flight": openai.max_in_flight, "onnx_compute": onnx.compute,
            "onnx_threads": onnx.threads}


def policy_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"rounds": 2, "block_texts": 160, "paired_texts": 32}
    return {"rounds": args.policy_rounds, "block_texts": args.policy_texts, "paired_texts": args.policy_paired_texts}


async def run_policies(workdir: Path, meshes: list[LocalMesh], args: argparse.Namespace,
                       compute: str) -> dict[str, Any]:
    """Phase 5 for one compute: one service per batching policy, all up for the whole phase, the service defaults
    otherwise (RAGFLEET_EMBEDDING_ONNX_COMPUTE set explicitly)."""
    settings = policy_settings(args)
    env = {"RAGFLEET_EMBEDDING_ONNX_COMPUTE": compute}
    services = {name: start_service(workdir, f"policy-{compute}-{name}", {**env, **policy_env})
                for name, policy_env in POLICIES.items()}
    meshes += services.values()
    try:
        result = await policy_sweep(services, MixedPool(SEED), **settings)
        print(f"  {compute}: phase 2's mix (85 % sentences, 15 % abstracts)", flush=True)
        result["sentence_mix"] = await policy_sweep(services, TextPool(SEED + 1), **settings,
                                                    callers=SENTENCE_MIX_CALLERS)
    finally:
        for mesh in services.values():
            mesh.stop()
    servers = lanes_of(compute)
    for name in POLICIES:
        result[name]["arrival_order_floor"] = arrival_order_floor(result[name].pop("unloaded_ms"), FLOOR_CALLERS,
                                                                  servers)
    return result | {"compute": compute, "lanes": servers, "settings": settings, "query_share": QUERY_SHARE,
                     "chunk_words": list(CHUNK_WORDS)}


async def run_all_policies(workdir: Path, meshes: list[LocalMesh], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for compute in args.policy_computes:
        print(f"  compute {compute}", flush=True)
        out[compute] = await run_policies(workdir, meshes, args, compute)
    return out


def _compute_words(compute: str, lanes: int) -> str:
    from services.embedding.config import OnnxConfig

    if compute == "int8":
        return (f"each text run alone on one thread, nothing padded, up to {lanes} embed calls at once, so length "
                "grouping saves no padding here")
    return f"one padded batch at a time on {OnnxConfig(compute=compute).threads} intra-op threads"


def policies_markdown(by_compute: dict[str, Any]) -> list[str]:
    first = next(iter(by_compute.values()))
    s, b = first["settings"], service_defaults()["batcher"]
    lines = [f"## Batching policies side by side ({round(100 * first['query_share'])} % short queries, the rest "
             f"~256-token chunks; {s['rounds']} rounds of {s['block_texts']} texts per policy at 8 and 64 callers, "
             f"{s['paired_texts']} paired texts at 1 caller; once per compute: {', '.join(by_compute)})", "",
             "`bounded` = the default (RAGFLEET_EMBEDDING_BATCH_POLICY=bounded, reorder window "
             f"{b['reorder_window_ms']:g} ms or {b['reorder_window_share']:g} of the oldest text's wait, whichever "
             "is longer); `bounded-fixed` = the same with RAGFLEET_EMBEDDING_REORDER_WINDOW_SHARE=0 (the window "
             "fixed, as before the share); `length` = pure length grouping. The policies take turns in blocks (ABC, "
             "CBA, ...) on the same texts. Percentiles leave out the first and last N calls of each block (all "
             "callers arriving at once, the drain at the end); peak oldest wait = the highest "
             "ragfleet_embedding_oldest_wait_seconds seen, polled every 100 ms. Each compute's services run on "
             "their own, one compute after the other."]
    for compute, policies in by_compute.items():
        lines += ["", f"### Compute {compute} (RAGFLEET_EMBEDDING_ONNX_COMPUTE={compute}; "
                  f"{_compute_words(compute, policies['lanes'])})", ""]
        lines += policy_rows(policies)
        lines += ["", f"{compute}, phase 2's mix ({round(100 * SENTENCE_SHARE)} % single sentences, the rest whole "
                  "abstracts), the same blocks at 64 callers: does the bounded policy cost throughput where length "
                  "grouping pays most?", ""]
        lines += policy_rows(policies["sentence_mix"], SENTENCE_MIX_CALLERS)
        servers = policies["lanes"]
        lines += ["", f"{compute}, floor of the 8-caller ratio: {FLOOR_CALLERS} closed-loop callers, "
                  + ("one text at a time" if servers == 1 else f"{servers} texts at a time (as the service runs "
                     "them)") + " in arrival order, each text costing exactly a latency measured at 1 caller in "
                  "this run (drawn with replacement, no batching, no overhead): " + ", ".join(
                      f"{name} p50 {f['p50']:.0f} ms, p99 {f['p99']:.0f} ms, p99/p50 {f['p99_over_p50']:.2f}"
                      for name in POLICIES for f in [policies[name]["arrival_order_floor"]]) + ". The spread the "
                  "texts' own costs leave (a ~256-token chunk costs several queries; which of the other 7 callers "
                  "hold one is chance), before any scheduling."]
    return lines


async def run_policies_only(args: argparse.Namespace) -> int:
    """--policies-only: phase 5 alone (a quick look while tuning; results go to *_quick, which git ignores)."""
    workdir = Path(tempfile.mkdtemp(prefix="embedding-bench-"))
    meshes: list[LocalMesh] = []
    figures: dict[str, Any] = {"seed": SEED, "service_defaults": service_defaults(),
                               "load_average_before": os.getloadavg()}
    try:
        figures["policies"] = await run_all_policies(workdir, meshes, args)
    finally:
        for mesh in meshes:
            mesh.stop()
    targets = policy_targets(figures["policies"])
    write_results("embedding_bench_policies_quick", figures=figures, targets=targets,
                  markdown="\n".join(policies_markdown(figures["policies"])), notes=[])
    for t in targets:
        print(f"  {t['name']}: {t['value']:.4g} (goal {t['goal']}) {'met' if t['met'] else 'NOT met'}")
    return 0


async def run(args: argparse.Namespace) -> int:
    if args.policies_only:
        return await run_policies_only(args)
    n_local, n_remote, n_cache = (32, 96, 16) if args.quick else (args.texts, args.remote_texts, args.cache_texts)
    compute = args.compute
    compute_env = {"RAGFLEET_EMBEDDING_ONNX_COMPUTE": compute}
    batch_sizes = (1, 8) if args.quick else BATCH_SIZES
    callers = CALLERS
    pool = TextPool(SEED)
    warm = pool.draw(256)
    local_texts = pool.draw(n_local)
    cache_texts = pool.draw(n_cache)
    remote_texts = pool.draw(n_remote)
    workdir = Path(tempfile.mkdtemp(prefix="embedding-bench-"))
    prefix = f"ragfleet-bench:{uuid.uuid4().hex[:8]}:emb:"
    figures: dict[str, Any] = {"seed": SEED, "sentence_share": SENTENCE_SHARE, "callers": list(callers),
                               "service_defaults": service_defaults(), "compute": compute,
                               "policy_computes": list(args.policy_computes)}
    if args.quiet_timeout > 0 and not args.quick:
        figures["start"] = wait_for_quiet(0.15, args.quiet_timeout)
    figures["load_average_before"] = os.getloadavg()
    meter = CpuMeter()
    meshes: list[LocalMesh] = []
    sim: SimProcess | None = None
    floor: FloorServer | None = None
    try:
        print(f"phase 1: in-process ceiling, compute {compute} ({n_local} texts)", flush=True)
        # The ceiling is the model at its best alone, run the way the service runs this compute. float32: one batch
        # at a time on the intra-op threads, which may spin (the service turns spinning off, which costs a lone model
        # a little and saves a shared machine a lot; batch 1 as served is measured too). int8: max_in_flight
        # single-threaded runs at once, as served (spinning does nothing with one intra-op thread).
        spin = lanes_of(compute) == 1
        if spin:
            backend = await open_backend(compute, allow_spinning=False)
            figures["batch1_as_served"] = await _pass(backend, backend.prepare(local_texts), 1)
            await backend.close()
            del backend
        backend = await open_backend(compute, allow_spinning=spin)
        figures["ceiling"] = await measure_ceiling(backend, local_texts, warm, batch_sizes, args.pass_seconds)
        if not spin:
            figures["batch1_as_served"] = figures["ceiling"]["orders"]["arrival"]["by_batch_size"]["1"]
        await backend.close()  # no model threads in the load generator during the sweep
        del backend
        meter.phase("ceiling")

        print("phase 2: local sweep (batched vs unbatched vs the bare floor)", flush=True)
        local = {"batched": start_service(workdir, "local-batched", compute_env),
                 "unbatched": start_service(workdir, "local-unbatched", {**compute_env, **UNBATCHED})}
        meshes += local.values()
        floor = FloorServer(workdir, compute_env)
        figures["local"] = await sweep(local, local_texts, warm, callers, floor=floor)
        for mesh in local.values():
            mesh.stop()
        floor.stop()
        floor = None
        meter.phase("local_sweep")

        print("  ceiling re-check", flush=True)
        backend = await open_backend(compute, allow_spinning=spin)
        figures["ceiling_recheck"] = await recheck_ceiling(backend, local_texts, figures["ceiling"])
        await backend.close()
        del backend
        meter.phase("ceiling_recheck")

        print("phase 3: cache hit vs miss (two replicas, L1 + Redis L2)", flush=True)
        cache_env = {**compute_env, "RAGFLEET_EMBEDDING_L1_MAX_MB": "64", "RAGFLEET_REDIS_URL": REDIS_URL,
                     "RAGFLEET_EMBEDDING_L2_PREFIX": prefix}
        replicas = [start_service(workdir, f"cache-{side}", cache_env) for side in "ab"]
        meshes += replicas
        figures["cache"] = await measure_cache(replicas[0], replicas[1], cache_texts, warm)
        c = figures["cache"]
        print(f"  miss p50 {c['miss']['p50']:.2f} ms, L1 hit p50 {c['l1_hit']['p50']:.3f} ms "
              f"({c['l1_hit_speedup_p50']:.1f}x), L2 hit p50 {c['l2_hit']['p50']:.3f} ms; cached Embed RPCs at 64 "
              f"callers: {c['rpc_capacity_64_callers']['texts_per_s']:.0f}/s", flush=True)
        for mesh in replicas:
            mesh.stop()
        meter.phase("cache")

        print(f"phase 4: remote sweep ({n_remote} texts, sim {SIM_CALL_MS} ms/call + {SIM_PER_TEXT_MS} ms/text)",
              flush=True)
        sim = SimProcess(["--embedding-call-ms", str(SIM_CALL_MS), "--embedding-per-text-ms", str(SIM_PER_TEXT_MS)])
        remote_env = {"RAGFLEET_EMBEDDING_BACKEND": "openai", "RAGFLEET_EMBEDDING_OPENAI_BASE_URL": sim.base_url,
                      "RAGFLEET_EMBEDDING_OPENAI_MODEL": "sim-embed"}
        remote = {"batched": start_service(workdir, "remote-batched", remote_env),
                  "unbatched": start_service(workdir, "remote-unbatched",
                                             {**remote_env, **UNBATCHED})}
        meshes += remote.values()
        figures["remote"] = await sweep(remote, remote_texts, warm, callers, sim)
        figures["remote_sim"] = {"call_ms": SIM_CALL_MS, "per_text_ms": SIM_PER_TEXT_MS}
        for mesh in remote.values():
            mesh.stop()
        sim.stop()
        meter.phase("remote_sweep")

        print(f"phase 5: batching policies side by side (bounded reordering vs pure length grouping), computes "
              f"{', '.join(args.policy_computes)}", flush=True)
        figures["policies"] = await run_all_policies(workdir, meshes, args)
        meter.phase("policies")
        figures["load_average_after"] = os.getloadavg()
        figures["cpu_by_phase"] = meter.phases
    finally:
        for mesh in meshes:
            mesh.stop()
        if floor is not None:
            floor.stop()
        if sim is not None:
            sim.stop()
        figures["redis_keys_deleted"] = cleanup_redis(prefix)
    targets, markdown = report(figures, callers)
    d = figures["service_defaults"]
    lanes = figures["ceiling"]["lanes"]
    b = d["batcher"]
    other = figures.get("cpu_by_phase", {})
    noise = ", ".join(f"{name} {100 * v['other_share_of_machine']:.0f} %" for name, v in other.items())
    notes = [
        f"All processes share this machine's {os.cpu_count()} cores: the load generator (this process, one asyncio "
        "loop, also the in-process ceiling), the embedding service(s) and, in phase 4, the sim LLM. The ceiling "
        "runs alone.",
        f"Compute: phases 1-3 run RAGFLEET_EMBEDDING_ONNX_COMPUTE={compute} (given to every service explicitly; "
        f"the service default is {d['onnx_compute']}): "
        + (f"each text runs alone (nothing padded) on one intra-op thread, up to {lanes} embed calls at once, in "
           "the service and in the ceiling alike." if lanes > 1 else
           f"one padded batch at a time on {d['onnx_threads']} intra-op threads, in the service and in the ceiling "
           "alike.")
        + f" Phase 4 is the remote backend (no ONNX); phase 5 runs once per compute: "
        f"{', '.join(args.policy_computes)}.",
        f"Other work on the machine during each phase (share of all cores not used by this benchmark's processes): "
        f"{noise or 'n/a'}; load average before {figures['load_average_before'][0]:.2f}"
        + (f"; waited {figures['start']['waited_seconds']:.0f} s for a quiet machine (quiet: "
           f"{'yes' if figures['start']['quiet'] else 'no, ran anyway'})." if "start" in figures else "."),
        f"Texts: SciFact corpus, seed {SEED}, {round(100 * SENTENCE_SHARE)} % single abstract sentences and "
        f"{100 - round(100 * SENTENCE_SHARE)} % whole abstracts, all distinct; each setting sends every text once "
        "(one text per call, closed loop); throughput = texts / wall time of the setting.",
        "Sweeps: L1 cache off, no Redis (the model is measured, not the cache); the service's default batcher "
        f"({b}); unbatched = RAGFLEET_EMBEDDING_MAX_BATCH_SIZE=1, MAX_WAIT_MS=0 (batches of one, no wait"
        + (f"; still up to {lanes} calls in flight" if lanes > 1 else "") + "). Each setting is preceded by a "
        "warm-up with the same caller count on other texts.",
        "At 1 caller, calls alternate between the batched and unbatched service and the bare floor text by text "
        "(paired), so all see the same texts under the same machine noise; throughput there = texts / sum of "
        "latencies.",
        "Bare floor (local sweep): bench/_embedding_floor.py, a bare grpc.aio Embed server (no interceptors, auth, "
        "metrics, tracing, validation, cache or batcher) doing the service's model work: the service's tokenizer and "
        "OnnxBackend built from the same environment (compute, threads), each request's texts tokenized inline and "
        "run on one of the backend's model threads, on the same event loop as the service. Its service CPU is its "
        "process's utime + stime from /proc; it has no metrics, so no backend busy share.",
        "Ceiling = best in-process throughput of the ONNX backend over batch sizes "
        f"{'/'.join(map(str, batch_sizes))} in arrival order (naive batching), the higher of a pass before and after "
        "the sweep, "
        + (f"with {lanes} embed calls at once (the backend's max_in_flight, as the service's batcher runs it), each "
           "taking the next batch; the session as served (one intra-op thread: spinning changes nothing). Nothing "
           "is padded, so no sorted passes." if lanes > 1 else
           "with onnxruntime's thread spinning on (the model alone at its best; the service runs with it off). "
           "Window-sorted and globally sorted passes show what grouping by length can give."),
        f"Remote: sim LLM {SIM_CALL_MS:.0f} ms per HTTP call + {SIM_PER_TEXT_MS} ms per text; the service's default "
        f"openai settings (max {d['openai_max_in_flight']} HTTP calls in flight, max "
        f"{min(d['openai_max_batch_size'], b['max_batch_size'])} texts per call: the batcher's cap applies too).",
        "Cache: replica A computes a text (miss) and answers it again (L1 hit); replica B, sharing Redis, answers "
        "it from L2, then from its promoted L1 entry; a bare gRPC health check on A is the floor of any hit. Keys "
        "under a per-run prefix, deleted afterwards.",
    ]
    write_results("embedding_bench_quick" if args.quick else "embedding_bench", figures=figures, targets=targets,
                  markdown=markdown, plot=plot(figures, callers), notes=notes)
    for t in targets:
        print(f"  {t['name']}: {t['value']:.4g} (goal {t['goal']}) {'met' if t['met'] else 'NOT met'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM (e.g. from `timeout`) must still stop the services and the sim: SystemExit runs the `finally`s.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few texts, batch sizes 1/8/64 (~1 min)")
    parser.add_argument("--texts", type=int, default=384, help="texts per local setting and for the ceiling")
    parser.add_argument("--remote-texts", type=int, default=1000, help="texts per remote setting")
    parser.add_argument("--cache-texts", type=int, default=200, help="texts in the cache phase")
    parser.add_argument("--pass-seconds", type=float, default=10.0,
                        help="in-process passes in arrival / window order stop at the next whole window after this")
    parser.add_argument("--policy-rounds", type=int, default=4,
                        help="phase 5: blocks per policy at 8 and 64 callers (ABBA order)")
    parser.add_argument("--policy-texts", type=int, default=320, help="phase 5: texts per block")
    parser.add_argument("--policy-paired-texts", type=int, default=200, help="phase 5: paired texts at 1 caller")
    parser.add_argument("--compute", choices=("int8", "float32"), default=None,
                        help="ONNX compute of phases 1-3 (default: the service's default, "
                             "RAGFLEET_EMBEDDING_ONNX_COMPUTE's default)")
    parser.add_argument("--policy-computes", default="int8,float32",
                        help="phase 5: the computes to run it for, comma-separated, in this order")
    parser.add_argument("--policies-only", action="store_true",
                        help="run phase 5 alone, results in embedding_bench_policies_quick.*")
    parser.add_argument("--quiet-timeout", type=float, default=300.0,
                        help="wait up to this many seconds for other work on the machine to stop (0: don't wait)")
    args = parser.parse_args(argv)
    from services.embedding.config import ONNX_COMPUTE, ONNX_COMPUTES

    args.compute = args.compute or ONNX_COMPUTE.default
    args.policy_computes = [c.strip() for c in args.policy_computes.split(",") if c.strip()]
    if not args.policy_computes or set(args.policy_computes) - set(ONNX_COMPUTES):
        parser.error(f"--policy-computes: a comma-separated list of {', '.join(ONNX_COMPUTES)}")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
