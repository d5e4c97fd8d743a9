"""The embedding model's two computes side by side: CPU per text and retrieval quality (issue 12).

`int8` (the default) quantises the MatMuls at run time and runs each text alone; `float32` is the packaged graph as
is (its int8 weights folded back to float at load). Both run through the service's own OnnxBackend, in this process:
1. CPU per text (process CPU time / texts) for SciFact queries and abstracts, one text per call, each compute at its
   default threads, and float32 also on one thread (the like-for-like core count).
2. Quality: every SciFact test query against the whole corpus (title + abstract), exact cosine search over the
   vectors, nDCG@10 and Recall@10/100 per compute; and how far the two computes' vectors are apart.
Vectors are cached in bench/.cache by model id and text hash, so a rerun measures only CPU.

    python -m bench.quantization [--cpu-texts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import CACHE_DIR, ROOT, load_beir, percentiles, target, write_results
from services.embedding.backends.onnx import OnnxBackend
from services.embedding.config import OnnxConfig, usable_cpus

SCIFACT = Path(os.environ.get("RAGFLEET_BENCH_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
COMPUTES = {"int8": OnnxConfig(compute="int8"), "float32": OnnxConfig(compute="float32"),
            "float32, 1 thread": OnnxConfig(compute="float32", intra_op_threads=1)}
NDCG_TOLERANCE = 0.005


async def cpu_per_text(backend: OnnxBackend, texts: list[str]) -> dict[str, Any]:
    items = backend.prepare(texts)
    await backend.embed(items[:4])  # warm
    walls = []
    cpu0 = time.process_time()
    for item in items:
        started = time.perf_counter()
        await backend.embed([item])
        walls.append((time.perf_counter() - started) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / len(items)
    return {"cpu_ms": cpu, "wall_ms": percentiles(walls), "mean_tokens": float(np.mean([i.token_count for i in items]))}


async def vectors(backend: OnnxBackend, texts: list[str], label: str) -> np.ndarray:
    digest = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"quantization-{label}-{backend.model_id}-{digest}.npy"
    if path.exists():
        return np.load(path)
    order = np.argsort([len(t) for t in texts])  # similar lengths together: little padding for float32
    out = np.zeros((len(texts), backend.dimension), dtype=np.float32)
    batches = [order[i:i + 16] for i in range(0, len(order), 16)]
    slots = asyncio.Semaphore(backend.max_in_flight)
    started = time.monotonic()

    async def one(batch: np.ndarray) -> None:
        async with slots:
            out[batch] = await backend.embed(backend.prepare([texts[i] for i in batch]))

    await asyncio.gather(*(one(b) for b in batches))
    print(f"  {backend.model_id} {label}: {len(texts)} texts in {time.monotonic() - started:.0f} s", flush=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def quality(doc_vectors: np.ndarray, query_vectors: np.ndarray, doc_ids: list[str], qrels: dict) -> dict[str, float]:
    scores = query_vectors @ doc_vectors.T
    top = np.argsort(-scores, axis=1)[:, :100]
    ndcg, r10, r100 = [], [], []
    for row, relevant in enumerate(qrels.values()):
        ranked = [doc_ids[i] for i in top[row]]
        dcg = sum(relevant.get(d, 0) / np.log2(rank + 2) for rank, d in enumerate(ranked[:10]))
        ideal = sum(1 / np.log2(rank + 2) for rank in range(min(10, len(relevant))))
        ndcg.append(dcg / ideal)
        r10.append(len(set(ranked[:10]) & set(relevant)) / len(relevant))
        r100.append(len(set(ranked) & set(relevant)) / len(relevant))
    return {"ndcg@10": float(np.mean(ndcg)), "recall@10": float(np.mean(r10)), "recall@100": float(np.mean(r100))}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-texts", type=int, default=200, help="queries timed per compute (abstracts: a fifth)")
    args = parser.parse_args()
    corpus, queries, qrels = load_beir(SCIFACT)
    test = qrels["test"]
    doc_ids = list(corpus)
    docs = [f"{corpus[d]['title']} {corpus[d]['text']}".strip() for d in doc_ids]
    query_texts = [queries[q] for q in test]
    cpu_queries, cpu_docs = query_texts[:args.cpu_texts], docs[:max(1, args.cpu_texts // 5)]

    cpu: dict[str, dict[str, Any]] = {}
    found: dict[str, dict[str, Any]] = {}
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, config in COMPUTES.items():
        backend = OnnxBackend(config)
        await backend.start()
        cpu[name] = {"queries": await cpu_per_text(backend, cpu_queries), "abstracts": await cpu_per_text(backend, cpu_docs)}
        if name != "float32, 1 thread":  # same vectors as float32
            kept[name] = (await vectors(backend, docs, "corpus"), await vectors(backend, query_texts, "test-queries"))
            found[name] = quality(*kept[name], doc_ids, test) | {"model": backend.model_id}
        await backend.close()

    cosines = {label: (kept["int8"][i] * kept["float32"][i]).sum(axis=1) for i, label in enumerate(("docs", "queries"))}
    apart = {label: {"min": float(c.min()), "p1": float(np.percentile(c, 1)), "median": float(np.median(c))}
             for label, c in cosines.items()}
    query_ratio = cpu["float32"]["queries"]["cpu_ms"] / cpu["int8"]["queries"]["cpu_ms"]
    doc_ratio = cpu["float32"]["abstracts"]["cpu_ms"] / cpu["int8"]["abstracts"]["cpu_ms"]
    drop = found["float32"]["ndcg@10"] - found["int8"]["ndcg@10"]

    lines = ["## CPU per text (one text per call, in process)", "",
             "| compute | threads | query CPU ms | query p50 ms | p95 | p99 | abstract CPU ms | abstract p50 ms | p95 | p99 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in cpu.items():
        q, a = row["queries"], row["abstracts"]
        threads = "1 per text" if name == "int8" else ("1" if "1 thread" in name else str(usable_cpus()))
        lines.append(f"| {name} | {threads} | {q['cpu_ms']:.2f} | {q['wall_ms']['p50']:.2f} | {q['wall_ms']['p95']:.2f} "
                     f"| {q['wall_ms']['p99']:.2f} | {a['cpu_ms']:.2f} | {a['wall_ms']['p50']:.2f} "
                     f"| {a['wall_ms']['p95']:.2f} | {a['wall_ms']['p99']:.2f} |")
    lines += ["", f"Mean tokens: queries {cpu['int8']['queries']['mean_tokens']:.1f}, abstracts "
              f"{cpu['int8']['abstracts']['mean_tokens']:.1f}. float32 / int8 CPU per text: queries {query_ratio:.2f}x, "
              f"abstracts {doc_ratio:.2f}x.", "",
              f"## Retrieval quality (SciFact test: {len(test)} queries, {len(docs)} documents, exact dense search)", "",
              "| compute | model id | nDCG@10 | Recall@10 | Recall@100 |", "|---|---|---|---|---|"]
    for name, q in found.items():
        lines.append(f"| {name} | `{q['model']}` | {q['ndcg@10']:.4f} | {q['recall@10']:.4f} | {q['recall@100']:.4f} |")
    lines += ["", "Cosine between the two computes' vectors of the same text: " + "; ".join(
        f"{label} min {v['min']:.4f}, 1st percentile {v['p1']:.4f}, median {v['median']:.4f}" for label, v in apart.items())]
    write_results(
        "quantization",
        figures={"cpu": cpu, "quality": found, "cosine_int8_vs_float32": apart},
        targets=[target("float32 / int8 CPU per SciFact query", round(query_ratio, 2), "> 1 (reported)", query_ratio > 1),
                 target("nDCG@10 float32 - int8 (SciFact test, dense)", round(drop, 4), f"<= {NDCG_TOLERANCE}",
                        drop <= NDCG_TOLERANCE)],
        markdown="\n".join(lines),
        notes=["Both computes run through services.embedding.backends.onnx.OnnxBackend in this process, one after the "
               "other; CPU is this process's CPU time over the texts, so the ratio is the one that matters.",
               "int8: onnxruntime's dynamic quantisation of every MatMul (per-channel int8 weights, int8 activations "
               "per tensor), each text alone on one thread; float32: the packaged graph, padded batches on the "
               "intra-op threads."])


if __name__ == "__main__":
    asyncio.run(main())
