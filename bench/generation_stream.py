"""Generation streaming cost: OpenAIAnswerer.stream against the simulated LLM at 100/200 concurrent streams.

The generation service reads every answer token from the LLM on one event loop; this measures what that costs per
token and how it shows up in time to first token (TTFT) of new streams while many others are flowing. Each
(variant, path, streams) cell runs in a fresh child process, so its CPU seconds are its own; the simulated LLM
(TTFT 200 ms, 20 tokens/s, 100 tokens: 2000 chunks/s with 100 streams open) runs in its own process.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.generation_stream --before 730e34c --aiohttp
    .venv/bin/python -m bench.generation_stream --quick        # smoke run: 50 streams, one round

Variants, interleaved round by round:
- after: the current tree (services/generation/llm.py and coalesce.py);
- before (--before REV): llm.py and coalesce.py as of git revision REV, copied to a temporary directory;
- after+aiohttp (--aiohttp): the current llm.py with the SDK's aiohttp transport (openai.DefaultAioHttpClient)
  instead of its default httpx2 one: the same code otherwise, to show what the HTTP stack itself costs.
Paths: direct (the answerer's events consumed as they come) and coalesced (through the Coalescer, as the Generate
servicer consumes them).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from bench._common import ROOT, finish_figure, percentiles, target, write_results
from bench._sim import SimProcess


LOAD_SIM = {"ttft_ms": 200.0, "tokens_per_second": 20.0, "max_tokens": 100}
RAMP_SECONDS = 5.0
TTFT_GOAL = 0.5  # seconds: TTFT p99 at 200 streams stays close to the sim's own 200 ms


# -- child: one cell ------------------------------------------------------------------------------------------------

def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _cell(args: argparse.Namespace) -> dict[str, Any]:
    from services.generation.base import Delta
    from services.generation.config import GenerationConfig, LLMConfig, LLMTimeouts
    from services.generation.prompt import PromptBuilder, TokenCounter
    from services.runtime.config import ServerConfig
    from services.runtime.pb.ragfleet.v1 import common_pb2, generation_pb2

    llm_module = _load(Path(args.llm), "llm_under_test")
    coalesce_module = _load(Path(args.coalesce), "coalesce_under_test")
    counter = TokenCounter()
    llm = LLMConfig(base_url=f"http://127.0.0.1:{args.port}/v1", default_model="sim-model",
                    timeouts=LLMTimeouts(connect=5.0, first_token=30.0, read=30.0), max_connections=1024)
    config = GenerationConfig(server=ServerConfig("generation"), llm=llm)
    answerer = llm_module.OpenAIAnswerer(llm, counter)
    builder = PromptBuilder(config, counter)
    prompts = []
    for i in range(args.streams):
        request = generation_pb2.GenerateRequest(
            question=f"What is the waggle dance? ({i})",
            passages=[common_pb2.Passage(number=1, text="Bees dance to tell each other where flowers are.")],
            params=common_pb2.GenerationParams(max_tokens=int(LOAD_SIM["max_tokens"])))
        prompts.append(await builder.build(request))
    loop = asyncio.get_running_loop()
    ttfts: list[float] = []
    durations: list[float] = []
    errors: dict[str, int] = {}
    deltas = 0

    async def one(prompt: Any) -> None:
        nonlocal deltas
        started = loop.time()
        first = True
        try:
            events = answerer.stream(prompt)
            if args.path == "coalesced":
                source = coalesce_module.Coalescer(events, max_bytes=1024, max_delay=0.005)
                async with source as stream_events:
                    async for event in stream_events:
                        if first and isinstance(event, Delta):
                            first = False
                            ttfts.append(loop.time() - started)
                        deltas += isinstance(event, Delta)
            else:
                async for event in events:
                    if first and isinstance(event, Delta):
                        first = False
                        ttfts.append(loop.time() - started)
                    deltas += isinstance(event, Delta)
            durations.append(loop.time() - started)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        """Event-loop lag: how late a 10 ms sleep wakes up while the streams run."""
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    # One warm-up stream (imports, first connection) outside the measured window.
    await one(prompts[0])
    ttfts.clear(), durations.clear(), errors.clear()
    deltas = 0
    lag_task = asyncio.create_task(ticker())
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0, wall0 = _cpu(), time.perf_counter()
    tasks = []
    gap = RAMP_SECONDS / args.streams
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(one(prompt)))
        next_start = wall0 + (i + 1) * gap
        await asyncio.sleep(max(0.0, next_start - time.perf_counter()))
    await asyncio.gather(*tasks)
    cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    stop.set()
    await lag_task
    await answerer.close()
    tokens = args.streams * int(LOAD_SIM["max_tokens"])  # upstream chunks with text; merged deltas count apart
    return {"streams": args.streams, "path": args.path, "ttft": percentiles(ttfts),
            "duration": percentiles(durations), "loop_lag": percentiles(lags), "errors": errors,
            "deltas": deltas, "tokens": tokens, "cpu_seconds": cpu, "wall_seconds": wall,
            "cpu_us_per_token": cpu / tokens * 1e6}


# -- parent: the sim, the matrix, the results -----------------------------------------------------------------------

def run_cell(sim: SimProcess, llm: Path, coalesce: Path, path: str, streams: int) -> dict[str, Any]:
    sim_cpu = sim.cpu_seconds()
    out = subprocess.run([sys.executable, __file__, "--child", "--llm", str(llm), "--coalesce", str(coalesce),
                          "--path", path, "--streams", str(streams), "--port", str(sim.port)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"cell failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["sim_cpu_seconds"] = sim.cpu_seconds() - sim_cpu
    return result


def variant_files(args: argparse.Namespace, workdir: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (llm.py, coalesce.py) for every variant asked for; copies go to workdir."""
    current_llm, current_coalesce = ROOT / "services/generation/llm.py", ROOT / "services/generation/coalesce.py"
    variants: dict[str, tuple[Path, Path]] = {}
    if args.before:
        files = []
        for name in ("llm.py", "coalesce.py"):
            text = subprocess.run(["git", "show", f"{args.before}:services/generation/{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            path = workdir / f"before_{name}"
            path.write_text(text)
            files.append(path)
        variants["before"] = (files[0], files[1])
    variants["after"] = (current_llm, current_coalesce)
    if args.aiohttp:
        text = current_llm.read_text()
        swapped = text.replace("openai.DefaultAsyncHttpxClient(", "openai.DefaultAioHttpClient(")
        if swapped == text:
            raise SystemExit("--aiohttp: llm.py no longer builds openai.DefaultAsyncHttpxClient(...)")
        path = workdir / "aiohttp_llm.py"
        path.write_text(swapped)
        variants["after+aiohttp"] = (path, current_coalesce)
    return variants


def summarise(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One entry per (variant, path, streams): the median round (with two rounds, the mean of both)."""
    metrics = {"ttft_p50_ms": lambda c: c["ttft"]["p50"] * 1000, "ttft_p99_ms": lambda c: c["ttft"]["p99"] * 1000,
               "cpu_seconds": lambda c: c["cpu_seconds"], "cpu_us_per_token": lambda c: c["cpu_us_per_token"],
               "loop_lag_p99_ms": lambda c: c["loop_lag"]["p99"] * 1000,
               "sim_cpu_seconds": lambda c: c["sim_cpu_seconds"]}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        grouped.setdefault(f"{cell['variant']}/{cell['path']}/{cell['streams']}", []).append(cell)
    summary = {}
    for key, group in grouped.items():
        entry: dict[str, Any] = {"variant": group[0]["variant"], "path": group[0]["path"],
                                 "streams": group[0]["streams"], "rounds": len(group),
                                 "errors": sum(sum(c["errors"].values()) for c in group)}
        for name, get in metrics.items():
            values = sorted(get(c) for c in group)
            mid = len(values) // 2
            entry[name] = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        summary[key] = entry
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="REV", help="also run llm.py + coalesce.py as of this git revision")
    parser.add_argument("--aiohttp", action="store_true", help="also run the current llm.py on the aiohttp transport")
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--paths", nargs="+", default=["direct", "coalesced"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llm", help=argparse.SUPPRESS)
    parser.add_argument("--coalesce", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)  # child: cProfile the load window into this file
    args = parser.parse_args()
    if args.child:
        args.streams = args.streams[0]
        print(json.dumps(asyncio.run(_cell(args)), default=float))
        return 0
    if args.quick:
        args.streams, args.rounds, args.paths = [50], 1, ["direct"]

    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="generation_stream_") as tmp:
        variants = variant_files(args, Path(tmp))
        sim = SimProcess()
        try:
            sim.control("/_sim/config", LOAD_SIM)
            for round_no in range(args.rounds):
                for streams in args.streams:
                    for path in args.paths:
                        for name, (llm, coalesce) in variants.items():
                            result = run_cell(sim, llm, coalesce, path, streams)
                            result.update(variant=name, round=round_no)
                            cells.append(result)
                            print(f"round {round_no} {name:13s} {path:9s} {streams:4d} streams: TTFT p50 "
                                  f"{result['ttft']['p50'] * 1000:6.1f} ms p99 {result['ttft']['p99'] * 1000:7.1f} ms"
                                  f" | CPU {result['cpu_seconds']:5.2f} s ({result['cpu_us_per_token']:4.0f} us/token)"
                                  f" | sim CPU {result['sim_cpu_seconds']:5.2f} s | lag p99 "
                                  f"{result['loop_lag']['p99'] * 1000:6.1f} ms | errors {result['errors']}", flush=True)
        finally:
            sim.stop()

    summary = summarise(cells)
    rows = ["| variant | path | streams | TTFT p50 ms | TTFT p99 ms | CPU s | CPU us/token | loop lag p99 ms |"
            " sim CPU s | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary.values():
        rows.append(f"| {e['variant']} | {e['path']} | {e['streams']} | {e['ttft_p50_ms']:.1f} | "
                    f"{e['ttft_p99_ms']:.1f} | {e['cpu_seconds']:.2f} | {e['cpu_us_per_token']:.0f} | "
                    f"{e['loop_lag_p99_ms']:.1f} | {e['sim_cpu_seconds']:.2f} | {e['errors']} |")
    targets = []
    for path in args.paths:
        for streams in args.streams:
            after = summary[f"after/{path}/{streams}"]
            goal_ms = 2 * LOAD_SIM["ttft_ms"]
            targets.append(target(f"after: TTFT p99, {streams} streams, {path} (ms)", after["ttft_p99_ms"],
                                  f"<= {goal_ms:.0f} (2x the sim's TTFT)", after["ttft_p99_ms"] <= goal_ms))
            before = summary.get(f"before/{path}/{streams}")
            if before is not None:
                ratio = before["cpu_seconds"] / after["cpu_seconds"]
                targets.append(target(f"CPU before/after, {streams} streams, {path} (x)", ratio, ">= 1.5",
                                      ratio >= 1.5))
            targets.append(target(f"after: errors, {streams} streams, {path}", after["errors"], "== 0",
                                  after["errors"] == 0))

    def plot(png: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in variants:
            for path in args.paths:
                entries = [summary[f"{name}/{path}/{s}"] for s in args.streams]
                style = "-" if path == "direct" else "--"
                label = f"{name} {path}"
                axes[0].plot(args.streams, [e["ttft_p99_ms"] for e in entries], style, marker="o", label=label)
                axes[1].plot(args.streams, [e["cpu_us_per_token"] for e in entries], style, marker="o", label=label)
        axes[0].set(xlabel="concurrent streams", ylabel="TTFT p99 (ms)", title="time to first token, p99")
        axes[1].set(xlabel="concurrent streams", ylabel="CPU us per token", title="client process CPU per token")
        finish_figure(fig, axes, png)

    notes = [f"sim-llm (own process): TTFT {LOAD_SIM['ttft_ms']:.0f} ms, {LOAD_SIM['tokens_per_second']:.0f} "
             f"tokens/s, {LOAD_SIM['max_tokens']} tokens per answer; streams started evenly over "
             f"{RAMP_SECONDS:.0f} s, so all are open at once around t = 5 s",
             "each cell is a fresh process; CPU = its user+system seconds over the load window (streams plus their "
             "connection setup); CPU per token divides by streams x 100 tokens; sim CPU = the sim process's seconds "
             "over the same cell",
             f"{args.rounds} round(s), variants interleaved within each round; figures are the median round "
             "(with two rounds, their mean)",
             "the sim and the client share the machine's cores (and the machine was shared with other work)"]
    if args.before:
        notes.append(f"before = services/generation/llm.py and coalesce.py at git revision {args.before}")
    # A --quick run is a smoke test: it must never replace the committed full results.
    write_results("generation_stream_quick" if args.quick else "generation_stream",
                  figures={"summary": list(summary.values()), "cells": cells},
                  targets=targets, markdown="\n".join(rows), plot=plot, notes=notes)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
