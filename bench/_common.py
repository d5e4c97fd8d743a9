"""Helpers the benchmarks share: machine facts, percentiles, the results writer (json + md + png), the sample-corpus
mesh's questions and one timed Ask, and BEIR data with its embeddings cached on disk."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc, gateway_pb2

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
CACHE_DIR = ROOT / "bench" / ".cache"  # embeddings of benchmark data, keyed by model and text hash
EMBED_BATCH = 32
EMBED_CONCURRENCY = 4


def stop_process(process: "subprocess.Popen[Any]", timeout: float = 10.0) -> None:
    """SIGTERM (a graceful drain), then SIGKILL if it has not exited within `timeout`; reaped either way."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "platform": platform.platform()}


def percentiles(values: Iterable[float], points: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """p50/p95/p99 (same unit as values) plus mean and count."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {f"p{p}": float("nan") for p in points} | {"mean": float("nan"), "n": 0}
    out = {f"p{p}": float(np.percentile(arr, p)) for p in points}
    out["mean"] = float(arr.mean())
    out["n"] = int(arr.size)
    return out


def target(name: str, value: float, goal: str, met: bool) -> dict[str, Any]:
    """One entry of the `targets` list: e.g. target("cache hit speedup", 31.2, ">= 20x", 31.2 >= 20)."""
    return {"name": name, "value": value, "goal": goal, "met": bool(met)}


def command_line() -> str:
    """How this run was started, as a reader would retype it: `python -m bench.<name> <args>` (under -m, argv[0] is
    the script's absolute path, which names the checkout it ran in rather than the command)."""
    script = Path(sys.argv[0])
    head = [f"-m", f"bench.{script.stem}"] if script.parent.name == "bench" else [sys.argv[0]]
    return " ".join(shlex.quote(a) for a in ["python", *head, *sys.argv[1:]])


def write_results(name: str, *, figures: dict[str, Any], targets: list[dict[str, Any]], markdown: str,
                  plot: Callable[[Path], None] | None = None, notes: Sequence[str] = ()) -> Path:
    """Write bench/results/<name>.json, .md (markdown + targets table) and .png (via plot(path))."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "command": command_line(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine_info(), "notes": list(notes), "figures": figures, "targets": targets}
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    lines = [f"# {name}", "", f"Command: `{payload['command']}`", "",
             f"Machine: {payload['machine']['cores']} cores, {payload['machine']['cpu_model']}", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", markdown.strip(), "", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    for t in targets:
        value = t["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {t['name']} | {shown} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        png = RESULTS_DIR / f"{name}.png"
        plot(png)
        lines += ["", f"![{name}]({name}.png)"]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(lines) + "\n")
    return json_path


# -- the sample corpus through a mesh ------------------------------------------------------------------------------

SAMPLE_CORPUS = ROOT / "services" / "cli" / "sample_corpus"
REDIS_URL = os.environ.get("RAGFLEET_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUESTIONS = [
    "How do honey bees tell each other where flowers are?", "What is the waggle dance?",
    "What is the round dance used for?", "How do bees make honey?", "How is beeswax produced?",
    "Why do colonies swarm?", "How do bees keep the hive warm in winter?", "What senses do bees have?",
    "What threatens honey bee colonies?", "How is a colony organised?", "What do foragers collect?",
    "How do bees pollinate plants?",
]
LOAD_SIM = {"ttft_ms": 200.0, "tokens_per_second": 20.0, "max_tokens": 100}


async def ask_once(stub: Any, question: str, *, first_token_only: bool = False,
                   **fields: Any) -> tuple[float, float, gateway_pb2.AskFinished | None]:
    """(time to first delta, total) in ms, client side, and the final event. With first_token_only the stream is
    cancelled at the first delta (a baseline TTFT need not wait out a 5 s answer)."""
    started = time.perf_counter()
    first = 0.0
    finished = None
    call = stub.Ask(gateway_pb2.AskRequest(question=question, **fields), timeout=60)
    async for event in call:
        kind = event.WhichOneof("event")
        if kind == "delta" and not first:
            first = (time.perf_counter() - started) * 1000
            if first_token_only:
                call.cancel()
                break
        elif kind == "finished":
            finished = event.finished
    return first, (time.perf_counter() - started) * 1000, finished


# -- BEIR data, embedded through the embedding service -------------------------------------------------------------

def load_beir(path: Path) -> tuple[dict[str, dict], dict[str, str], dict[str, dict[str, dict[str, int]]]]:
    corpus = {}
    with open(path / "corpus.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            corpus[str(doc["_id"])] = {"title": doc.get("title", ""), "text": doc.get("text", "")}
    queries = {}
    with open(path / "queries.jsonl") as f:
        for line in f:
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for split in ("train", "test"):
        qrels[split] = {}
        with open(path / "qrels" / f"{split}.tsv") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                qrels[split].setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    return corpus, queries, qrels


async def embed_all(stub: embedding_pb2_grpc.EmbeddingServiceStub, texts: list[str], input_type: int,
                    label: str) -> tuple[np.ndarray, str]:
    out: list[np.ndarray | None] = [None] * len(texts)
    model = ""
    sem = asyncio.Semaphore(EMBED_CONCURRENCY)
    done = 0
    started = time.monotonic()

    async def one(start: int) -> None:
        nonlocal done, model
        async with sem:
            reply = await stub.Embed(embedding_pb2.EmbedRequest(texts=texts[start:start + EMBED_BATCH],
                                                                input_type=input_type), timeout=600)
        model = reply.model
        for i, e in enumerate(reply.embeddings):
            out[start + i] = np.asarray(e.values, dtype=np.float32)
        done += len(reply.embeddings)
        if done % 1024 < EMBED_BATCH:
            print(f"  embedded {label}: {done}/{len(texts)} ({time.monotonic() - started:.0f}s)", flush=True)

    await asyncio.gather(*(one(s) for s in range(0, len(texts), EMBED_BATCH)))
    return np.stack(out), model  # type: ignore[arg-type]


async def cached_vectors(stub, texts: list[str], input_type: int, label: str) -> tuple[np.ndarray, dict[str, Any]]:
    probe = await stub.Embed(embedding_pb2.EmbedRequest(texts=["probe"], input_type=input_type), timeout=60)
    digest = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"scifact-{label}-{probe.model.replace('/', '_')}-{probe.dimension}-{digest}.npy"
    if path.exists():
        vectors = np.load(path)
        return vectors, {"source": "cache", "path": str(path.relative_to(ROOT)), "model": probe.model}
    started = time.monotonic()
    vectors, model = await embed_all(stub, texts, input_type, label)
    seconds = time.monotonic() - started
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors, {"source": "embedding service", "seconds": round(seconds, 1), "model": model,
                     "texts_per_second": round(len(texts) / seconds, 1)}


def finish_figure(fig: Any, axes: Iterable[Any], png: Path, *, dpi: int = 100) -> None:
    """The house style for line charts of rates or counts: y from 0, a legend and a light grid on every axis; save."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=dpi)
    plt.close(fig)


# -- Redis clean-up ------------------------------------------------------------------------------------------------

def delete_keys(*patterns: str, url: str = REDIS_URL) -> int:
    """Delete every key matching any of `patterns` (globs, e.g. a run's prefix + "*"); returns how many went. Each
    benchmark (and test, through tests/_redis.py) writes under its own key prefix and deletes it afterwards."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deleted = 0
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                deleted += client.delete(*keys)
        return deleted
    finally:
        client.close()


# -- the mesh the CPU-cost benchmarks measure ----------------------------------------------------------------------

def cost_mesh(sim_base_url: str, name: str, env: dict[str, str] | None = None) -> Any:
    """The four services against the sim LLM, started, with the sample corpus ingested, as bench/ask_cost.py and
    bench/tracing_cost.py measure them: no API keys, Redis for the gateway only (its keys under a prefix of this
    run), data in a fresh temporary directory; `env` adds to or overrides the services' environment. Returns the
    LocalMesh, which stops the services as a context manager: `with cost_mesh(sim.base_url, "cost") as mesh:`."""
    import tempfile
    import uuid

    from services.cli.ingest import ingest_path
    from services.cli.mesh import LocalMesh

    prefix = f"ragfleet-bench:{uuid.uuid4().hex[:8]}:{name}:"
    mesh_env = {"RAGFLEET_LLM_BASE_URL": sim_base_url, "RAGFLEET_LLM_MODEL": "sim-llm",
                "RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_GATEWAY_API_KEYS": "",
                "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix, "RAGFLEET_REDIS_URL": ""} | (env or {})
    mesh = LocalMesh(data_dir=Path(tempfile.mkdtemp(prefix=f"{name}-")), env=mesh_env,
                     service_env={"gateway": {"RAGFLEET_REDIS_URL": REDIS_URL}})
    try:
        mesh.start()
        ingest_path(mesh.address("gateway"), str(SAMPLE_CORPUS), show_progress=False)
    except BaseException:
        mesh.stop()
        raise
    return mesh
