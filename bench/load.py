"""Open-loop load test (issue 12): a realistic Ask mix at Poisson arrivals, swept over rates, beside the bare floor.

Arrivals are scheduled in advance (exponential gaps at the step's rate) and each Ask's TTFT and total latency are
measured from its SCHEDULED arrival, not from when it was sent: a slow server (or a busy load generator) cannot slow
the offered load or hide its own queueing. The mix, per Ask:
  - repeated questions (--repeat, default 47.5 %): a hot pool of 40, asked once before the sweep, so the response
    cache answers them;
  - novel questions (the rest): scifact queries read in place from ../shared/data/scifact, each asked once per tree
    (a numbered suffix once the pool is spent), so each needs an embedding, a search and an answer;
  - follow-ups in conversations (--followup, default 5 %): a few conversations, so history is loaded and stored;
  - and a background Ingest of one scifact document per second (another tenant: its corpus-version bumps would
    otherwise expire the hot answers every second, and the repeated half would measure the cache's refill instead).
The mesh is started as bench/gateway_bench.py starts it: four LocalMesh processes, the default offline answerer,
embedded Qdrant, Redis for the gateway; the corpus is the sample corpus plus --corpus-docs scifact abstracts.

After the sweep, --refine bisection steps per tree (default 2, trees alternating) narrow each tree's limit between
its highest sustainable step and the next one run, so a 40/s grid reads the limit to 10/s.
Per step: TTFT and total p50/p95/p99 (all Asks and per kind), errors by status code, response/embedding/retrieval
cache hit ratios (client statuses and each service's Prometheus counters), CPU per service from /proc (seconds per
Ask answered), the load generator's own lag. A step is sustainable when TTFT p99 <= 500 ms with 0 errors; after a
step far past that a tree skips the higher rates, except the 100/s target step (always run, --target-seconds long).
--baseline-tree runs the same sweep against another checkout (its services started with cwd and PYTHONPATH set to
it, on this venv), interleaved rate by rate with this tree (ABBA order). The bare mesh (bench/_bare_mesh.py) is
measured first, in the same run, as the floor.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.load --baseline-tree /tmp/base   # full run (<= 15 min)
    .venv/bin/python -m bench.load --rates 5,10 --seconds 5 --corpus-docs 20 --no-floor --name load_smoke  # smoke

Writes bench/results/<name>.{json,md,png} (default name: load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from bench._bare_mesh import measure_floor
from bench._common import REDIS_URL, ROOT, SAMPLE_CORPUS, percentiles, target, write_results
from bench._sim import cpu_seconds
from services.cli.ingest import read_documents
from services.cli.mesh import SERVICES, LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

SCIFACT = Path(os.environ.get("RAGFLEET_BENCH_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
HOT_QUESTIONS = 40
CONVERSATIONS = 8
FOLLOW_UPS = ["Can you say more about that?", "What evidence supports this?", "Why does that happen?",
              "How was that measured?", "What are the limits of that finding?"]
INGEST_INTERVAL_S = 1.0
SUSTAINABLE_TTFT_P99_MS = 500.0
# A step this far past the limit ends a tree's sweep: higher rates would only queue up to the deadline.
GIVE_UP_TTFT_P99_MS = 4 * SUSTAINABLE_TTFT_P99_MS
GIVE_UP_ERROR_RATIO = 0.05
CLIENT_MAX_IN_FLIGHT = 2000  # beyond the gateway's MAX_IN_FLIGHT (512): the gateway refuses first
TARGET_RATE = 100.0
TARGET_SECONDS = 60.0


# -- the workload ---------------------------------------------------------------------------------------------------

def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


@dataclass
class Workload:
    """The Ask mix for one tree. Two trees built with the same seed ask the same questions in the same order."""

    hot: list[str]
    novel: list[str]
    repeat: float
    followup: float
    label: str
    _used: int = 0

    def next_novel(self) -> str:
        base = self.novel[self._used % len(self.novel)]
        cycle = self._used // len(self.novel)
        self._used += 1
        return base if cycle == 0 else f"{base} ({cycle})"

    def request(self, rng: random.Random) -> tuple[str, gateway_pb2.AskRequest]:
        roll = rng.random()
        if roll < self.followup:
            conversation = f"{self.label}-conversation-{rng.randrange(CONVERSATIONS)}"
            return "followup", gateway_pb2.AskRequest(question=rng.choice(FOLLOW_UPS), conversation_id=conversation)
        if roll < self.followup + self.repeat:
            return "repeated", gateway_pb2.AskRequest(question=rng.choice(self.hot))
        return "novel", gateway_pb2.AskRequest(question=self.next_novel())


def workload(label: str, *, repeat: float, followup: float) -> Workload:
    queries = [q["text"] for q in read_jsonl(SCIFACT / "queries.jsonl")]
    random.Random(12).shuffle(queries)
    return Workload(hot=queries[:HOT_QUESTIONS], novel=queries[HOT_QUESTIONS:], repeat=repeat, followup=followup,
                    label=label)


def scifact_documents(start: int, count: int) -> list[gateway_pb2.Document]:
    rows = read_jsonl(SCIFACT / "corpus.jsonl", start + count)[start:]
    return [gateway_pb2.Document(doc_id=f"scifact-{r['_id']}", title=r.get("title", ""), text=r["text"])
            for r in rows if r.get("text")]


def poisson_arrivals(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) in [0, seconds): exponential gaps of mean 1/rate."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 50)
    times = np.cumsum(gaps)
    while times[-1] < seconds:  # (practically never) too few gaps drawn
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=len(times)))])
    return times[times < seconds]


# -- one mesh -------------------------------------------------------------------------------------------------------

@dataclass
class Tree:
    """One checkout's mesh, its API keys and its question stream."""

    label: str
    path: Path
    mesh: LocalMesh
    ask_md: tuple[tuple[str, str], ...]
    ingest_md: tuple[tuple[str, str], ...]
    prefix: str
    work: Workload
    next_ingest_doc: int = 0
    ingest_docs: list[gateway_pb2.Document] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    gave_up_at: float | None = None
    profiled: dict[str, Any] | None = None

    @property
    def pids(self) -> dict[str, int]:
        return {name: self.mesh.processes[name].process.pid for name in SERVICES}


def start_tree(label: str, path: Path, work: Workload, data_dir: Path) -> Tree:
    run = uuid.uuid4().hex[:8]
    prefix = f"ragfleet-bench:{run}:load-{label}:"
    ask_key, ingest_key = f"load-{run}", f"ingest-{run}"
    # Tenants unique to the run: no Redis key (corpus version included) is shared with the other tree or another run.
    # CORPUS_VERSION_KEY is for the baseline's gateway (today's reads the key retrieval writes, and ignores it).
    env = {"RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_REDIS_URL": "",
           "RAGFLEET_GATEWAY_API_KEYS": f"{ask_key}=load-{run},{ingest_key}=load-ingest-{run}",
           "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix, "RAGFLEET_GATEWAY_CORPUS_VERSION_KEY": prefix + "version:{tenant}"}
    if path != ROOT:
        env["PYTHONPATH"] = str(path)
    # Redis for the gateway only (response cache, versions, conversations), as in bench/gateway_bench.py.
    mesh = LocalMesh(data_dir=data_dir / label, env=env, service_env={"gateway": {"RAGFLEET_REDIS_URL": REDIS_URL}})
    # `python -m services.<name>` puts the working directory first on sys.path: it must be the tree's own.
    with contextlib.chdir(path):
        mesh.start()
    return Tree(label, path, mesh, (("authorization", f"Bearer {ask_key}"),),
                (("authorization", f"Bearer {ingest_key}"),), prefix, work)


async def prepare(tree: Tree, stub: gateway_pb2_grpc.GatewayServiceStub, corpus_docs: int) -> dict[str, Any]:
    """Ingest the corpus, then ask every hot question once (cached from here on) and warm the connections."""
    started = time.perf_counter()
    docs = list(read_documents(SAMPLE_CORPUS)) + scifact_documents(0, corpus_docs)
    for i in range(0, len(docs), 64):
        await stub.Ingest(gateway_pb2.IngestRequest(documents=docs[i:i + 64]), metadata=tree.ask_md, timeout=600)
    ingested = time.perf_counter() - started
    # The ingest tenant's first write creates its collection: a one-off that would land in the first step.
    await stub.Ingest(gateway_pb2.IngestRequest(documents=[tree.ingest_docs[0]]), metadata=tree.ingest_md, timeout=60)
    tree.next_ingest_doc = 1
    for question in tree.work.hot:
        async for _ in stub.Ask(gateway_pb2.AskRequest(question=question), metadata=tree.ask_md, timeout=60):
            pass
    for question in FOLLOW_UPS:  # their embeddings, as a real conversation's second turn would find them
        async for _ in stub.Ask(gateway_pb2.AskRequest(question=question, bypass_cache=True), metadata=tree.ask_md,
                                timeout=60):
            pass
    return {"documents": len(docs), "ingest_seconds": ingested, "warm_seconds": time.perf_counter() - started}


def scrape(mesh: LocalMesh) -> dict[str, float]:
    """Every counter sample of every service: {"service name{labels}": value}."""
    out: dict[str, float] = {}
    for name in SERVICES:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_ports[name]}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            if family.type != "counter":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    out[f"{name} {sample.name}{{{labels}}}"] = sample.value
    return out


def hit_ratios(before: dict[str, float], after: dict[str, float], statuses: Counter[str]) -> dict[str, float | None]:
    def delta(prefix: str, **labels: str) -> float:
        want = [f"{k}={v}" for k, v in labels.items()]
        return sum(v - before.get(k, 0.0) for k, v in after.items()
                   if k.startswith(prefix + "{") and all(w in k for w in want))

    def ratio(hits: float, total: float) -> float | None:
        return hits / total if total else None

    hits = statuses["CACHE_STATUS_HIT_EXACT"] + statuses["CACHE_STATUS_HIT_SEMANTIC"]
    emb_hits = delta("embedding ragfleet_embedding_cache_hits_total")
    emb_misses = delta("embedding ragfleet_embedding_cache_misses_total", level="l1")
    ret_hits = delta("retrieval ragfleet_retrieval_cache_total", result="l1_hit") + delta(
        "retrieval ragfleet_retrieval_cache_total", result="l2_hit")
    ret_all = ret_hits + delta("retrieval ragfleet_retrieval_cache_total", result="miss")
    return {"response_cache_client": ratio(hits, hits + statuses["CACHE_STATUS_MISS"]),
            "response_cache_gateway": ratio(
                delta("gateway ragfleet_gateway_cache_lookups_total", result="hit_exact")
                + delta("gateway ragfleet_gateway_cache_lookups_total", result="hit_semantic"),
                sum(delta("gateway ragfleet_gateway_cache_lookups_total", result=r)
                    for r in ("hit_exact", "hit_semantic", "miss", "error"))),
            "embedding_cache": ratio(emb_hits, emb_hits + emb_misses),
            "retrieval_cache": ratio(ret_hits, ret_all)}


# -- one step -------------------------------------------------------------------------------------------------------

@dataclass
class StepRecord:
    ttft: dict[str, list[float]] = field(default_factory=lambda: {"all": [], "repeated": [], "novel": [],
                                                                    "followup": []})
    total: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    deltas_uncached: list[int] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    ingest_ms: list[float] = field(default_factory=list)
    ingest_codes: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0


async def ask(stub: gateway_pb2_grpc.GatewayServiceStub, md: Any, kind: str, request: gateway_pb2.AskRequest,
              scheduled: float, deadline: float, rec: StepRecord) -> None:
    if rec.in_flight >= CLIENT_MAX_IN_FLIGHT:
        rec.codes["CLIENT_SHED"] += 1
        return
    rec.in_flight += 1
    rec.peak_in_flight = max(rec.peak_in_flight, rec.in_flight)
    rec.lag.append((time.perf_counter() - scheduled) * 1000)
    first, deltas, finished = None, 0, None
    try:
        async for event in stub.Ask(request, metadata=md, timeout=deadline):
            which = event.WhichOneof("event")
            if which == "delta":
                deltas += 1
                if first is None:
                    first = (time.perf_counter() - scheduled) * 1000
            elif which == "finished":
                finished = event.finished
        if finished is None or first is None:
            rec.codes["NO_FINISHED_OR_NO_DELTA"] += 1
            return
        rec.codes["OK"] += 1
        rec.total.append((time.perf_counter() - scheduled) * 1000)
        rec.ttft["all"].append(first)
        rec.ttft[kind].append(first)
        status = gateway_pb2.CacheStatus.Name(finished.cache_status)
        rec.statuses[status] += 1
        if status in ("CACHE_STATUS_MISS", "CACHE_STATUS_BYPASS"):
            rec.deltas_uncached.append(deltas)
    except grpc.aio.AioRpcError as exc:
        rec.codes[exc.code().name] += 1
    finally:
        rec.in_flight -= 1


async def ingest_loop(tree: Tree, stub: gateway_pb2_grpc.GatewayServiceStub, stop: asyncio.Event,
                      rec: StepRecord) -> None:
    """One scifact document per second into the ingest tenant, each call in its own task (a slow one never delays
    the next)."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(doc: gateway_pb2.Document) -> None:
        started = time.perf_counter()
        try:
            await stub.Ingest(gateway_pb2.IngestRequest(documents=[doc]), metadata=tree.ingest_md, timeout=30)
            rec.ingest_ms.append((time.perf_counter() - started) * 1000)
            rec.ingest_codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            rec.ingest_codes[exc.code().name] += 1

    while not stop.is_set():
        doc = tree.ingest_docs[tree.next_ingest_doc % len(tree.ingest_docs)]
        tree.next_ingest_doc += 1
        task = asyncio.create_task(one(doc))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), INGEST_INTERVAL_S)
    if tasks:
        await asyncio.wait(tasks)


async def run_step(tree: Tree, stub: gateway_pb2_grpc.GatewayServiceStub, rate: float, seconds: float,
                   deadline: float) -> dict[str, Any]:
    arrivals = poisson_arrivals(rate, seconds, seed=int(rate * 1000))
    rng = random.Random(int(rate * 1000))
    rec = StepRecord()
    pids = tree.pids | {"load generator": os.getpid()}
    counters_before = await asyncio.to_thread(scrape, tree.mesh)
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    stop = asyncio.Event()
    ingest = asyncio.create_task(ingest_loop(tree, stub, stop, rec))
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    for offset in arrivals:
        scheduled = started + float(offset)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        kind, request = tree.work.request(rng)
        task = asyncio.create_task(ask(stub, tree.ask_md, kind, request, scheduled, deadline, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.sleep(max(0.0, started + seconds - time.perf_counter()))
    stop.set()
    if tasks:
        await asyncio.wait(tasks)
    await ingest
    wall = time.perf_counter() - started
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    counters_after = await asyncio.to_thread(scrape, tree.mesh)
    ok = rec.codes["OK"]
    errors = sum(n for code, n in rec.codes.items() if code != "OK") + sum(
        n for code, n in rec.ingest_codes.items() if code != "OK")
    ttft = {kind: percentiles(values) for kind, values in rec.ttft.items()}
    return {
        "tree": tree.label, "offered_rate": rate, "seconds": seconds, "sent": len(arrivals),
        "achieved_rate": ok / seconds, "wall_seconds": wall, "ok": ok, "errors": errors,
        "codes": dict(rec.codes), "ingest_codes": dict(rec.ingest_codes), "ingest_ms": percentiles(rec.ingest_ms),
        "ttft_ms": ttft, "total_ms": percentiles(rec.total), "cache_statuses": dict(rec.statuses),
        "hit_ratios": hit_ratios(counters_before, counters_after, rec.statuses),
        "deltas_per_uncached_answer": float(np.mean(rec.deltas_uncached)) if rec.deltas_uncached else 0.0,
        "cpu_seconds": cpu, "cores": {name: used / wall for name, used in cpu.items()},
        "cpu_ms_per_ask": {name: used / max(ok, 1) * 1000 for name, used in cpu.items()},
        "mesh_cpu_ms_per_ask": sum(cpu[n] for n in SERVICES) / max(ok, 1) * 1000,
        "send_lag_ms": percentiles(rec.lag), "peak_in_flight": rec.peak_in_flight,
        "sustainable": ttft["all"]["p99"] <= SUSTAINABLE_TTFT_P99_MS and errors == 0 and ok > 0,
    }


def highest_sustainable(steps: dict[str, dict[str, Any]]) -> float:
    """The highest offered rate whose step was sustainable (0 if none); the table shows every step's verdict."""
    return max((s["offered_rate"] for s in steps.values() if s["sustainable"]), default=0.0)


def next_refinement(steps: dict[str, dict[str, Any]], resolution: float) -> float | None:
    """The rate halfway (to 5/s) between the highest sustainable step and the lowest step run above it, or None
    when there is no such bracket or it is already `resolution` wide or narrower. On a sweep's grid of 40/s the
    limit is only known to within a step; each refinement halves that."""
    low = highest_sustainable(steps)
    above = [s["offered_rate"] for s in steps.values() if s["offered_rate"] > low]
    if low <= 0 or not above or min(above) - low <= resolution:
        return None
    middle = round((low + min(above)) / 2 / 5) * 5
    return middle if low < middle < min(above) else None


# -- the sweep ------------------------------------------------------------------------------------------------------

async def sweep(args: argparse.Namespace, trees: list[Tree], started: float) -> None:
    channels = {t.label: grpc.aio.insecure_channel(t.mesh.address("gateway")) for t in trees}
    try:
        stubs = {label: gateway_pb2_grpc.GatewayServiceStub(c) for label, c in channels.items()}
        for tree in trees:
            tree.ingest_docs = scifact_documents(args.corpus_docs, 2000)
            info = await prepare(tree, stubs[tree.label], args.corpus_docs)
            print(f"[{tree.label}] {info['documents']} documents ingested in {info['ingest_seconds']:.1f}s, "
                  f"warm in {info['warm_seconds']:.1f}s", flush=True)
        for i, rate in enumerate(args.rates):
            seconds = args.target_seconds if rate == TARGET_RATE else args.seconds
            for tree in (trees if i % 2 == 0 else trees[::-1]):  # ABBA: neither tree always runs second
                # A tree past its limit skips the rates above, except the target's own step (its figures are the
                # target's values, however far off).
                if tree.gave_up_at is not None and rate != TARGET_RATE:
                    continue
                await _step(tree, stubs[tree.label], rate, seconds, args, started)
        # Bisect each tree's limit between its last sustainable step and the next one run, trees alternating.
        for i in range(args.refine):
            for tree in (trees if i % 2 == 0 else trees[::-1]):
                rate = next_refinement(tree.steps, args.refine_resolution)
                if rate is None:
                    continue
                await _step(tree, stubs[tree.label], rate, args.seconds, args, started)
        if args.profile_rate:
            for tree in trees:
                tree.profiled = await profile_step(tree, stubs[tree.label], args)
    finally:
        for channel in channels.values():
            await channel.close()


async def _step(tree: Tree, stub: gateway_pb2_grpc.GatewayServiceStub, rate: float, seconds: float,
                args: argparse.Namespace, started: float) -> None:
    """Run one step (unless it would end past the --max-minutes budget), keep it, print its line, stop the tree's
    sweep once it is far past sustainable, then pause."""
    if time.perf_counter() - started + seconds + args.deadline > args.max_minutes * 60:
        print(f"[{tree.label}] {rate:g}/s skipped: the {args.max_minutes:g} min budget is spent", flush=True)
        return
    step = await run_step(tree, stub, rate, seconds, args.deadline)
    tree.steps[f"{rate:g}"] = step
    t = step["ttft_ms"]["all"]
    print(f"[{tree.label}] {rate:g}/s x {seconds:g}s: ok {step['ok']}/{step['sent']} codes {step['codes']} "
          f"TTFT p50 {t['p50']:.0f} p99 {t['p99']:.0f} ms, total p99 {step['total_ms']['p99']:.0f} ms, "
          f"mesh CPU {step['mesh_cpu_ms_per_ask']:.1f} ms/Ask, hits {step['hit_ratios']}, "
          f"{'sustainable' if step['sustainable'] else 'NOT sustainable'}", flush=True)
    errors = step["errors"] / max(step["sent"], 1)
    if tree.gave_up_at is None and (t["p99"] > GIVE_UP_TTFT_P99_MS or errors > GIVE_UP_ERROR_RATIO
                                    or step["ok"] == 0):
        tree.gave_up_at = rate
        print(f"[{tree.label}] stops at {rate:g}/s: far past sustainable", flush=True)
    await asyncio.sleep(args.pause)


async def profile_step(tree: Tree, stub: gateway_pb2_grpc.GatewayServiceStub,
                       args: argparse.Namespace) -> dict[str, Any]:
    """One more step at --profile-rate, after the sweep, with py-spy recording every service (issue 12, item 3).

    Apart from the sweep because py-spy's sampling takes CPU from the same 2 cores: the sweep's figures stay clean,
    and this step's own figures (kept beside the profiles) show what the profiled load was.
    """
    out = Path(args.profile_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    rate, ext = args.profile_rate, "svg" if args.profile_format == "flamegraph" else "txt"
    spies = {name: await asyncio.create_subprocess_exec(
        py_spy, "record", "-p", str(pid), "-d", f"{args.seconds:g}", "-r", "100", "-f", args.profile_format,
        "--nonblocking", "-o", str(out / f"{name}-{tree.label}-load{rate:g}.{ext}"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL) for name, pid in tree.pids.items()}
    step = await run_step(tree, stub, rate, args.seconds, args.deadline)
    codes = {name: await spy.wait() for name, spy in spies.items()}
    t = step["ttft_ms"]["all"]
    print(f"[{tree.label}] profiled {rate:g}/s: ok {step['ok']}/{step['sent']} TTFT p50 {t['p50']:.0f} "
          f"p99 {t['p99']:.0f} ms, CPU ms/Ask {step['cpu_ms_per_ask']}; py-spy exits {codes}; profiles in {out}",
          flush=True)
    return step | {"profiles": {name: f"{name}-{tree.label}-load{rate:g}.{ext}" for name in spies},
                   "py_spy_exit_codes": codes}


# -- report ---------------------------------------------------------------------------------------------------------

def floor_per_ask(floor: dict[str, Any], step: dict[str, Any]) -> float | None:
    """The bare mesh's CPU for this step's mix (model): cached Asks at the cached floor, the rest at the 4-hop
    floor plus the relay floor per delta beyond the first."""
    if not floor or "canned" not in floor:
        return None
    statuses = step["cache_statuses"]
    answered = sum(statuses.values())
    if not answered:
        return None
    cached = (statuses.get("CACHE_STATUS_HIT_EXACT", 0) + statuses.get("CACHE_STATUS_HIT_SEMANTIC", 0)) / answered
    per_token = floor.get("relay", {}).get("mesh_us_per_token", 0.0) / 1000
    uncached = floor["canned"]["mesh_cpu_ms_per_ask"] + max(0.0, step["deltas_per_uncached_answer"] - 1) * per_token
    return cached * floor["cached"]["mesh_cpu_ms_per_ask"] + (1 - cached) * uncached


def report(figures: dict[str, Any], trees: list[Tree]) -> tuple[list[dict[str, Any]], str]:
    floor = figures.get("floor") or {}
    new = trees[0]
    lines = ["## Sweep (open loop, Poisson arrivals; latency from the scheduled arrival)", "",
             "| tree | offered /s | s | answered /s | errors | TTFT p50 | p95 | p99 | total p50 | p99 | "
             "response cache hits | embedding cache hits | mesh CPU ms/Ask | floor ms/Ask (model) | "
             "CPU ms/Ask: " + ", ".join(SERVICES) + ", load generator | sustainable |",
             "|---" * 16 + "|"]
    for tree in trees:
        for step in sorted(tree.steps.values(), key=lambda s: s["offered_rate"]):
            t, total, cpu = step["ttft_ms"]["all"], step["total_ms"], step["cpu_ms_per_ask"]
            hits = step["hit_ratios"]
            fl = floor_per_ask(floor, step)
            step["floor_mesh_cpu_ms_per_ask"] = fl
            codes = {k: v for k, v in step["codes"].items() if k != "OK"} | {
                f"Ingest {k}": v for k, v in step["ingest_codes"].items() if k != "OK"}
            lines.append(
                f"| {tree.label} | {step['offered_rate']:g} | {step['seconds']:g} | {step['achieved_rate']:.1f} | "
                f"{codes or 0} | {t['p50']:.0f} | {t['p95']:.0f} | {t['p99']:.0f} | {total['p50']:.0f} | "
                f"{total['p99']:.0f} | {_pct(hits['response_cache_client'])} | {_pct(hits['embedding_cache'])} | "
                f"{step['mesh_cpu_ms_per_ask']:.2f} | {'-' if fl is None else f'{fl:.2f}'} | "
                + ", ".join(f"{cpu[n]:.2f}" for n in (*SERVICES, "load generator"))
                + f" | {'yes' if step['sustainable'] else 'no'} |")
    best = {tree.label: highest_sustainable(tree.steps) for tree in trees}
    figures["highest_sustainable_rate"] = best
    lines += ["", "Highest sustainable rate (TTFT p99 <= 500 ms, 0 errors): "
              + ", ".join(f"{label} {rate:g} Asks/s" for label, rate in best.items())]
    if floor:
        from bench._bare_mesh import report as floor_report

        lines += ["", floor_report(floor)]
    targets = []
    at_target = new.steps.get(f"{TARGET_RATE:g}")
    if at_target is not None:
        t = at_target["ttft_ms"]["all"]
        label = f"{TARGET_RATE:g} Asks/s for {at_target['seconds']:g} s"
        targets += [target(f"{label}: TTFT p50 (ms)", t["p50"], "<= 50", t["p50"] <= 50),
                    target(f"{label}: TTFT p99 (ms)", t["p99"], "<= 300", t["p99"] <= 300),
                    target(f"{label}: errors", at_target["errors"], "== 0 (and >= 60 s)",
                           at_target["errors"] == 0 and at_target["seconds"] >= TARGET_SECONDS)]
    else:
        targets.append(target(f"{TARGET_RATE:g} Asks/s for {TARGET_SECONDS:g} s", "not reached",
                              "TTFT p50 <= 50, p99 <= 300 ms, 0 errors", False))
    if len(trees) > 1:
        base = best[trees[1].label]
        ratio = best[new.label] / base if base else float("inf") if best[new.label] else 0.0
        targets.append(target(f"highest sustainable rate, {new.label} / {trees[1].label} (same run)", ratio, ">= 2",
                              ratio >= 2))
    return targets, "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def plot(trees: list[Tree], floor: dict[str, Any]):  # type: ignore[no-untyped-def]
    def draw(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        for tree, color in zip(trees, ("tab:blue", "tab:orange")):
            steps = sorted(tree.steps.values(), key=lambda s: s["offered_rate"])
            x = [s["offered_rate"] for s in steps]
            axes[0][0].plot(x, [s["ttft_ms"]["all"]["p50"] for s in steps], "o-", color=color,
                            label=f"{tree.label} p50")
            axes[0][0].plot(x, [s["ttft_ms"]["all"]["p99"] for s in steps], "s--", color=color,
                            label=f"{tree.label} p99")
            axes[0][1].plot(x, [s["total_ms"]["p50"] for s in steps], "o-", color=color, label=f"{tree.label} p50")
            axes[0][1].plot(x, [s["total_ms"]["p99"] for s in steps], "s--", color=color, label=f"{tree.label} p99")
            axes[1][0].plot(x, [s["achieved_rate"] for s in steps], "o-", color=color, label=f"{tree.label} answered")
            axes[1][1].plot(x, [s["mesh_cpu_ms_per_ask"] for s in steps], "o-", color=color, label=tree.label)
            if floor:
                axes[1][1].plot(x, [s.get("floor_mesh_cpu_ms_per_ask") or np.nan for s in steps], ":", color=color,
                                label=f"bare floor, {tree.label}'s mix")
        axes[0][0].axhline(SUSTAINABLE_TTFT_P99_MS, color="red", lw=0.8, label="500 ms (sustainable p99)")
        axes[0][0].set(title="TTFT vs offered load", xlabel="offered Asks/s", ylabel="ms", yscale="log")
        axes[0][1].set(title="total latency vs offered load", xlabel="offered Asks/s", ylabel="ms", yscale="log")
        top = max([s["offered_rate"] for t in trees for s in t.steps.values()] or [1])
        axes[1][0].plot([0, top], [0, top], color="grey", lw=0.8, label="answered = offered")
        axes[1][0].set(title="throughput", xlabel="offered Asks/s", ylabel="answered Asks/s")
        axes[1][1].set(title="mesh CPU per Ask (4 services, /proc)", xlabel="offered Asks/s", ylabel="ms",
                       ylim=(0, None))
        for ax in axes.flat:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)

    return draw


# -- main -----------------------------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    figures: dict[str, Any] = {"rates": args.rates, "seconds": args.seconds, "target_seconds": args.target_seconds,
                               "mix": {"repeated": args.repeat, "followup": args.followup,
                                       "novel": 1 - args.repeat - args.followup, "ingest_per_second": 1},
                               "corpus_docs": args.corpus_docs, "deadline_s": args.deadline}
    if not args.no_floor:
        print("bare mesh floor", flush=True)
        figures["floor"] = await measure_floor(asks=args.floor_asks, hops=args.floor_asks // 3,
                                               streams=args.floor_streams)
    specs = [("new", ROOT)] + ([("main", Path(args.baseline_tree).resolve())] if args.baseline_tree else [])
    data_dir = Path(tempfile.mkdtemp(prefix="ragfleet-load-"))
    trees: list[Tree] = []
    try:
        for label, path in specs:
            t0 = time.perf_counter()
            trees.append(start_tree(label, path, workload(label, repeat=args.repeat, followup=args.followup),
                                    data_dir))
            print(f"[{label}] mesh from {path} up in {time.perf_counter() - t0:.1f}s", flush=True)
        await sweep(args, trees, started)
        figures["trees"] = {t.label: {"path": str(t.path), "steps": t.steps, "gave_up_at": t.gave_up_at,
                                      "profiled_step": t.profiled} for t in trees}
        figures["services_exited"] = {t.label: getattr(t.mesh.exited(), "name", None) for t in trees}
    finally:
        for tree in trees:
            tree.mesh.stop()
            _cleanup_redis(tree.prefix)
    figures["elapsed_seconds"] = time.perf_counter() - started
    targets, markdown = report(figures, trees)
    notes = [f"All processes share this machine's {os.cpu_count()} cores: the load generator (this process, on "
             "uvloop), every mesh under test (idle while the other tree's step runs) and the bare mesh (first).",
             "Latency is measured from each Ask's scheduled arrival time; 'send lag' in the json is how late the "
             "load generator actually sent (its own saturation shows there, and counts against the mesh).",
             f"Mix: {args.repeat:.1%} repeated (40 hot questions, cached before the sweep), {args.followup:.1%} "
             f"conversation follow-ups ({CONVERSATIONS} conversations), the rest novel scifact queries; one Ingest "
             "per second of a scifact abstract into a second tenant.",
             "CPU per Ask: each service's /proc user+system seconds over the step (arrivals + drain), background "
             "ingest included, divided by the Asks answered.",
             "Floor per Ask (model): the bare mesh's cached-shape CPU for the step's cache hits, its 4-hop CPU plus "
             "its relay CPU per extra delta for the rest (bench/_bare_mesh.py, same run)."]
    write_results(args.name, figures=figures, targets=targets, markdown=markdown,
                  plot=plot(trees, figures.get("floor")), notes=notes)
    print(markdown)
    for t in targets:
        print(f"  {t['name']}: {t['value']} (goal {t['goal']}) {'met' if t['met'] else 'NOT met'}")
    return 0


def _cleanup_redis(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[5.0, 10.0, 20.0, 40.0, 70.0, 100.0], help="offered Asks/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each step (5-60)")
    parser.add_argument("--target-seconds", type=float, default=TARGET_SECONDS,
                        help=f"length of the {TARGET_RATE:g}/s step (the issue's target is 60 s)")
    parser.add_argument("--baseline-tree", default=None, help="another checkout to run the same sweep against")
    parser.add_argument("--repeat", type=float, default=0.475, help="share of repeated (cached) questions")
    parser.add_argument("--followup", type=float, default=0.05, help="share of conversation follow-ups")
    parser.add_argument("--corpus-docs", type=int, default=100, help="scifact abstracts ingested before the sweep")
    parser.add_argument("--deadline", type=float, default=10.0, help="each Ask's deadline (s)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between steps")
    parser.add_argument("--max-minutes", type=float, default=14.0, help="steps that would end later are skipped")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare mesh")
    parser.add_argument("--floor-asks", type=int, default=300, help="sequential Asks per bare CPU measurement")
    parser.add_argument("--floor-streams", type=int, default=100, help="streams for the bare relay cost (0: skip)")
    parser.add_argument("--name", default="load", help="results name under bench/results/")
    parser.add_argument("--refine", type=int, default=2,
                        help="after the sweep, bisection steps per tree between its highest sustainable rate and the "
                             "next rate run (0: none)")
    parser.add_argument("--refine-resolution", type=float, default=10.0,
                        help="stop refining once the bracket is this narrow (Asks/s)")
    parser.add_argument("--profile-rate", type=float, default=None,
                        help="after the sweep, one more step per tree at this rate with py-spy on every service")
    parser.add_argument("--profile-dir", default=str(ROOT / "bench" / "results" / "profiles"),
                        help="where --profile-rate writes <service>-<tree>-load<rate>.svg")
    parser.add_argument("--profile-format", choices=("flamegraph", "raw"), default="flamegraph",
                        help="raw: collapsed stacks (.txt) for a text summary")
    args = parser.parse_args(argv)
    args.seconds = min(max(args.seconds, 1.0), 60.0)
    args.target_seconds = min(max(args.target_seconds, 1.0), 120.0)
    if not 0 <= args.repeat + args.followup <= 1:
        parser.error("--repeat + --followup must be within [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM (e.g. from `timeout`) must still stop the meshes: turn it into SystemExit for `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return uvloop.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
