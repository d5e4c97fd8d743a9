"""Cold start of `ragfleet up` and one Ask's per-stage timings (issue 2), as a new user meets them.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.cold_start [--runs 3]

Each run: `ragfleet up --port-base 0` on an empty data dir (a new process tree; the OS file cache is warm after the
first run), timed until it prints the gateway address (all four services SERVING on grpc.health.v1); `ragfleet
ingest` of the sample corpus; three Asks over gRPC (a first question, the same again, a new one) whose AskFinished
timings are the gateway's own per-stage figures; then SIGINT, timed until every process has exited.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


import grpc
from google.protobuf.json_format import MessageToDict

from bench._common import ROOT, SAMPLE_CORPUS, percentiles, write_results
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc


RAGFLEET = [sys.executable, "-m", "services.cli"]
ASKS = [("first question", "Why do honeybee colonies swarm?"),
        ("same question again", "Why do honeybee colonies swarm?"),
        ("new question", "How do bees keep the hive warm in winter?")]
STAGES = ["cacheMs", "embedMs", "retrieveMs", "rerankMs", "firstTokenMs", "totalMs"]


def one_run(data_dir: str) -> dict[str, Any]:
    started = time.perf_counter()
    up = subprocess.Popen([*RAGFLEET, "up", "--port-base", "0", "--data-dir", data_dir], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = None
    try:
        assert up.stdout is not None
        for line in up.stdout:
            match = re.search(r"gateway\D*(127\.0\.0\.1:\d+)", line)
            if match:
                address = match.group(1)
                break
        if address is None:
            raise RuntimeError(f"ragfleet up exited with {up.wait()} before printing the gateway address")
        cold_start = time.perf_counter() - started
        subprocess.run([*RAGFLEET, "ingest", "--gateway", address, str(SAMPLE_CORPUS)], cwd=ROOT, check=True,
                       capture_output=True)
        asks = []
        with grpc.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for label, question in ASKS:
                finished = None
                for event in stub.Ask(gateway_pb2.AskRequest(question=question), timeout=30):
                    if event.HasField("finished"):
                        finished = event.finished
                assert finished is not None
                timings = MessageToDict(finished.timings)
                asks.append({"ask": label, "cache": gateway_pb2.CacheStatus.Name(finished.cache_status),
                             **{stage: float(timings.get(stage, 0.0)) for stage in STAGES}})
    finally:
        stop_started = time.perf_counter()
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    return {"cold_start_s": cold_start, "stop_s": time.perf_counter() - stop_started, "exit_code": code,
            "asks": asks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ragfleet-cold-") as data_dir:
            runs.append(one_run(data_dir))
        print(f"run {i + 1}: up in {runs[-1]['cold_start_s']:.2f} s, stopped in {runs[-1]['stop_s']:.2f} s "
              f"(exit {runs[-1]['exit_code']})", flush=True)
    cold = percentiles(r["cold_start_s"] for r in runs)
    stop = percentiles(r["stop_s"] for r in runs)
    lines = ["| run | cold start s | Ctrl-C to all stopped s | exit code |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['cold_start_s']:.2f} | {r['stop_s']:.2f} | {r['exit_code']} |" for i, r in enumerate(runs)]
    lines += ["", "Per-stage timings of each Ask (ms, the gateway's AskFinished.timings), median over runs:", "",
              "| ask | cache status | cache | embed | retrieve | rerank | first token | total |",
              "|---|---|---|---|---|---|---|---|"]
    medians: dict[str, dict[str, float]] = {}
    for i, (label, _) in enumerate(ASKS):
        per = {stage: percentiles(r["asks"][i][stage] for r in runs)["p50"] for stage in STAGES}
        medians[label] = per
        status = runs[-1]["asks"][i]["cache"].removeprefix("CACHE_STATUS_")
        lines.append(f"| {label} | {status} | " + " | ".join(f"{per[s]:.2f}" for s in STAGES) + " |")

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.25
        for j, label in enumerate(medians):
            ax.bar([k + j * width for k in range(len(STAGES))], [medians[label][s] for s in STAGES], width,
                   label=label)
        ax.set_xticks([k + width for k in range(len(STAGES))], [s.removesuffix("Ms") for s in STAGES])
        ax.set(ylabel="ms (median over runs)", title=f"one Ask per stage; ragfleet up cold start p50 {cold['p50']:.2f} s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=90)

    write_results("cold_start", figures={"runs": runs, "cold_start_s": cold, "stop_s": stop, "ask_medians_ms": medians},
                  targets=[], markdown="\n".join(lines), plot=plot,
                  notes=["Embedded defaults (ONNX embedding, qdrant-edge, extractive answerer, no Redis), sample corpus.",
                         "The issue sets no numeric target for these figures; they are reported as measured."])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
