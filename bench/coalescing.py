"""Time-window coalescing of deltas (issue 12, item 4): window on vs off, side by side, at 20, 60 and 150 tokens/s.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.coalescing
    .venv/bin/python -m bench.coalescing --quick          # smoke run: one round, 4 streams, 40 tokens

Two meshes run at once against one sim LLM: "on" with the defaults (RAGFLEET_GENERATION_COALESCE_WINDOW_MS and
RAGFLEET_GATEWAY_COALESCE_WINDOW_MS = 20), "off" with both windows 0 (today's behaviour: one message per token
unless a consumer lags). For each rate, round by round and alternating which mesh goes first, N concurrent Asks
(bypass_cache, so each embeds, retrieves and streams) and per mesh:
- messages per token at the client: delta messages received / completion tokens;
- CPU per token: generation + gateway CPU (/proc, user + system) over the cell, less N x their fixed cost per Ask
  (measured first with one-token answers), divided by the tokens streamed;
- added delay per token: each token's arrival at the client above the stream's own even schedule (the sim spaces
  its tokens evenly: least-squares slope, offset at the earliest token); window off shows the path's own jitter,
  the difference is what the window adds; and the gap between consecutive messages at the client (p50/p99).
Writes bench/results/coalescing.{json,md,png} (--quick: coalescing_quick.*).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench._common import QUESTIONS, SAMPLE_CORPUS, ask_once, finish_figure, percentiles, target, write_results
from bench._sim import SimProcess, cpu_seconds
from services.cli.ingest import ingest_path
from services.cli.mesh import LocalMesh
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc

RATES = (20.0, 60.0, 150.0)
WINDOW_MS = 20.0
MODES = {"on": WINDOW_MS, "off": 0.0}
HOT = ("generation", "gateway")  # the processes a streamed token crosses
ONE_TOKEN_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 1}
TTFT_MS = 50.0


async def fixed_cost(stub: Any, pids: dict[str, int], n: int) -> dict[str, float]:
    """CPU seconds per one-token Ask of each hot process (what an Ask costs before its tokens)."""
    for i in range(10):
        await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for i in range(n):
        await ask_once(stub, QUESTIONS[i % len(QUESTIONS)], bypass_cache=True)
    return {name: (cpu_seconds(pid) - before[name]) / n for name, pid in pids.items()}


async def one_stream(stub: Any, question: str) -> tuple[list[tuple[float, int]], int]:
    """[(arrival, tokens in the message)] of the deltas, and the completion tokens the answer reports."""
    arrivals: list[tuple[float, int]] = []
    tokens = 0
    async for event in stub.Ask(gateway_pb2.AskRequest(question=question, bypass_cache=True), timeout=120):
        kind = event.WhichOneof("event")
        if kind == "delta":
            text = event.delta.text
            # The sim's tokens are "According", then " word" each: a message holds one token per leading space.
            arrivals.append((time.perf_counter(), text.count(" ") + (0 if arrivals else 1)))
        elif kind == "finished":
            tokens = event.finished.usage.completion_tokens
    return arrivals, tokens


def added_delays(arrivals: list[tuple[float, int]]) -> list[float]:
    """Each token's arrival above the stream's even schedule: the slope is the least-squares fit of arrival against
    token index (a hold shifts tokens by at most a window, evenly along the stream, so it barely tilts the fit), the
    offset the lowest token (one that left unheld). Jitter of the path shows as well; window off measures it alone."""
    times = np.asarray([at for at, count in arrivals for _ in range(count)])
    if times.size < 3:
        return []
    index = np.arange(times.size)
    step = np.polyfit(index, times, 1)[0]
    residual = times - index * step
    return list(residual - residual.min())


def message_gaps(arrivals: list[tuple[float, int]]) -> list[float]:
    """Time between consecutive delta messages at the client (the inter-token gap the reader sees)."""
    return [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]


async def cell(stub: Any, pids: dict[str, int], fixed: dict[str, float], streams: int) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    results = await asyncio.gather(*(one_stream(stub, f"[{uuid.uuid4().hex[:6]}] {QUESTIONS[i % len(QUESTIONS)]}")
                                     for i in range(streams)))
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    tokens = sum(t for _, t in results)
    messages = sum(len(a) for a, _ in results)
    delays = [d for a, _ in results for d in added_delays(a)]
    gaps = [g for a, _ in results for g in message_gaps(a)]
    streaming_cpu = {name: max(0.0, cpu[name] - streams * fixed[name]) for name in pids}
    return {"streams": streams, "tokens": tokens, "messages": messages, "messages_per_token": messages / tokens,
            "cpu_seconds": cpu, "cpu_us_per_token": sum(streaming_cpu.values()) / tokens * 1e6,
            "cpu_us_per_token_raw": sum(cpu.values()) / tokens * 1e6,
            "cpu_us_per_token_by_process": {n: v / tokens * 1e6 for n, v in streaming_cpu.items()},
            "added_delay_ms": {k: v * 1000 if k != "n" else v for k, v in percentiles(delays, (50, 99)).items()},
            "added_delay_max_ms": max(delays) * 1000 if delays else float("nan"),
            "message_gap_ms": {k: v * 1000 if k != "n" else v for k, v in percentiles(gaps, (50, 99)).items()}}


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


async def run(args: argparse.Namespace) -> int:
    sim = SimProcess()
    meshes: dict[str, LocalMesh] = {}
    cells: list[dict[str, Any]] = []
    fixed: dict[str, dict[str, float]] = {}
    try:
        for mode, window in MODES.items():
            windows = {"RAGFLEET_GENERATION_COALESCE_WINDOW_MS": str(window),
                       "RAGFLEET_GATEWAY_COALESCE_WINDOW_MS": str(window)}
            env = {"RAGFLEET_LLM_BASE_URL": sim.base_url, "RAGFLEET_LLM_MODEL": "sim-llm",
                   "RAGFLEET_LOG_LEVEL": "WARNING", "RAGFLEET_GATEWAY_API_KEYS": "", "RAGFLEET_REDIS_URL": "",
                   **windows}
            meshes[mode] = LocalMesh(data_dir=Path(tempfile.mkdtemp(prefix=f"coalescing-{mode}-")), env=env)
            meshes[mode].start()
            ingest_path(meshes[mode].address("gateway"), str(SAMPLE_CORPUS), show_progress=False)
        channels = {mode: grpc.aio.insecure_channel(mesh.address("gateway")) for mode, mesh in meshes.items()}
        stubs = {mode: gateway_pb2_grpc.GatewayServiceStub(channel) for mode, channel in channels.items()}
        pids = {mode: {name: mesh.processes[name].process.pid for name in HOT} for mode, mesh in meshes.items()}
        sim.configure(ONE_TOKEN_SIM)
        for mode in MODES:
            fixed[mode] = await fixed_cost(stubs[mode], pids[mode], args.fixed_asks)
            print(f"{mode}: fixed CPU per Ask {({n: round(v * 1000, 2) for n, v in fixed[mode].items()})} ms",
                  flush=True)
        for round_no in range(args.rounds):
            for rate in RATES:
                sim.configure({"ttft_ms": TTFT_MS, "tokens_per_second": rate, "max_tokens": args.tokens})
                order = list(MODES) if (round_no + RATES.index(rate)) % 2 == 0 else list(MODES)[::-1]
                for mode in order:
                    result = await cell(stubs[mode], pids[mode], fixed[mode], args.streams)
                    result.update(mode=mode, rate=rate, round=round_no)
                    cells.append(result)
                    print(f"round {round_no} {rate:5.0f} tok/s window {mode:3s}: {result['messages_per_token']:.3f} "
                          f"msgs/token | {result['cpu_us_per_token']:5.0f} us CPU/token "
                          f"(raw {result['cpu_us_per_token_raw']:5.0f}) | added delay p50 "
                          f"{result['added_delay_ms']['p50']:5.1f} p99 {result['added_delay_ms']['p99']:5.1f} ms",
                          flush=True)
        for channel in channels.values():
            await channel.close()
    finally:
        for mesh in meshes.values():
            mesh.stop()
        sim.stop()

    summary: dict[str, dict[str, Any]] = {}
    for rate in RATES:
        for mode in MODES:
            group = [c for c in cells if c["rate"] == rate and c["mode"] == mode]
            summary[f"{mode}/{rate:.0f}"] = {
                "mode": mode, "rate": rate, "rounds": len(group),
                "messages_per_token": median([c["messages_per_token"] for c in group]),
                "cpu_us_per_token": median([c["cpu_us_per_token"] for c in group]),
                "cpu_us_per_token_raw": median([c["cpu_us_per_token_raw"] for c in group]),
                "added_delay_p50_ms": median([c["added_delay_ms"]["p50"] for c in group]),
                "added_delay_p99_ms": median([c["added_delay_ms"]["p99"] for c in group]),
                "added_delay_max_ms": max(c["added_delay_max_ms"] for c in group),
                "message_gap_p50_ms": median([c["message_gap_ms"]["p50"] for c in group]),
                "message_gap_p99_ms": median([c["message_gap_ms"]["p99"] for c in group])}
    rows = ["| tokens/s | window | msgs/token | fewer msgs (off/on) | CPU us/token (gen+gw) | CPU raw us/token |"
            " added delay per token p50 ms | p99 ms | max ms | gap between messages p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    targets = []
    for rate in RATES:
        on, off = summary[f"on/{rate:.0f}"], summary[f"off/{rate:.0f}"]
        ratio = off["messages_per_token"] / on["messages_per_token"]
        for e in (on, off):
            shown = f"{ratio:.2f}x" if e is on else ""
            rows.append(f"| {rate:.0f} | {e['mode']} ({WINDOW_MS if e is on else 0:.0f} ms) | "
                        f"{e['messages_per_token']:.3f} | {shown} | {e['cpu_us_per_token']:.0f} | "
                        f"{e['cpu_us_per_token_raw']:.0f} | {e['added_delay_p50_ms']:.1f} | "
                        f"{e['added_delay_p99_ms']:.1f} | {e['added_delay_max_ms']:.1f} | "
                        f"{e['message_gap_p50_ms']:.1f} | {e['message_gap_p99_ms']:.1f} |")
        added_p99 = on["added_delay_p99_ms"] - off["added_delay_p99_ms"]
        targets.append(target(f"{rate:.0f} tokens/s: added delay per token p99, window on minus off (ms)", added_p99,
                              f"<= {WINDOW_MS:.0f} (the window)", added_p99 <= WINDOW_MS))
        added_gap = on["message_gap_p99_ms"] - off["message_gap_p99_ms"]
        targets.append(target(f"{rate:.0f} tokens/s: gap between messages p99, window on minus off (ms)", added_gap,
                              f"<= {WINDOW_MS:.0f} (the window)", added_gap <= WINDOW_MS))
        if rate == 150.0:
            targets.append(target("150 tokens/s: messages per token, off / on (x)", ratio, ">= 2", ratio >= 2))

    def plot(png: Path) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for mode, style in (("on", "-"), ("off", "--")):
            entries = [summary[f"{mode}/{r:.0f}"] for r in RATES]
            label = f"window {WINDOW_MS:.0f} ms" if mode == "on" else "window 0"
            axes[0].plot(RATES, [e["messages_per_token"] for e in entries], style, marker="o", label=label)
            axes[1].plot(RATES, [e["cpu_us_per_token"] for e in entries], style, marker="o", label=label)
            axes[2].plot(RATES, [e["added_delay_p99_ms"] for e in entries], style, marker="o", label=label)
        axes[0].set(xlabel="LLM tokens/s", ylabel="messages per token", title="client messages per token")
        axes[1].set(xlabel="LLM tokens/s", ylabel="CPU us per token", title="generation + gateway CPU per token")
        axes[2].set(xlabel="LLM tokens/s", ylabel="ms", title="added delay per token, p99")
        finish_figure(fig, axes, png)

    notes = [f"sim-llm (own process): TTFT {TTFT_MS:.0f} ms, {args.tokens} tokens per answer, at each rate; "
             f"{args.streams} concurrent Asks per cell (bypass_cache: each embeds and retrieves first)",
             "two meshes up at once, identical but for both COALESCE_WINDOW_MS variables; cells alternate which "
             f"goes first; {args.rounds} round(s), figures are the median round (max delay: the max of all)",
             "CPU per token = (generation + gateway CPU over the cell - streams x their fixed CPU per one-token Ask) "
             "/ tokens; raw = without that subtraction",
             "added delay: per stream, each token's client arrival minus its slot on the stream's even schedule "
             "(least-squares slope, offset at its earliest token); with window 0 it is the path's own jitter",
             "the meshes, the sim and this client share the machine's 2 cores (and the machine was shared with other "
             "work)"]
    write_results("coalescing_quick" if args.quick else "coalescing",
                  figures={"summary": list(summary.values()), "fixed_cpu_seconds_per_ask": fixed, "cells": cells},
                  targets=targets, markdown="\n".join(rows), plot=plot, notes=notes)
    print("\n".join(rows))
    for t in targets:
        print(f"{'met' if t['met'] else 'NOT MET'}: {t['name']} = {t['value']:.3g} ({t['goal']})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16, help="concurrent Asks per cell")
    parser.add_argument("--tokens", type=int, default=120, help="tokens per answer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fixed-asks", type=int, default=60, help="one-token Asks for the fixed cost per Ask")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.tokens, args.rounds, args.fixed_asks = 4, 40, 1, 10
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
