"""bench/embedding_bench.py's bare-floor row: its CPU read from /proc and its line in the local sweep table."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/ is scripts, not an installed package

from bench.embedding_bench import FLOOR, FloorServer, _sweep_rows, floor_view  # noqa: E402


def test_floor_cpu_is_the_process_utime_plus_stime() -> None:
    server = object.__new__(FloorServer)
    server.process = SimpleNamespace(pid=os.getpid())
    sum(i * i for i in range(300_000))  # some CPU of our own to read
    own = os.times()
    read = server.cpu_seconds()
    assert abs(read - (own.user + own.system)) < 0.05


def row(tps: float, service: dict) -> dict:
    return {"texts_per_s": tps, "latency_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0}, "codes": {"OK": 64},
            "service": service}


def test_the_floor_is_a_third_mode_with_no_busy_share() -> None:
    service = {"batches": 8.0, "mean_batch_size": 8.0, "padded_tokens": 1200.0, "model_busy_share": 1.5,
               "service_cpu_cores": 1.2}
    floor = floor_view(10.0, 11.5, texts=64, wall=1.0)
    assert floor["service_cpu_cores"] == 1.5 and floor["mean_batch_size"] == 1.0
    result = {"batched": {"64": row(200.0, service)}, "unbatched": {"64": row(190.0, service)},
              FLOOR: {"64": row(240.0, floor)}}
    lines = _sweep_rows(result, [64])
    assert lines[-1] == "| 64 | bare floor | 240.0 | 10.0 | 20.0 | 30.0 | 1.0 | - | 1.50 cores | 0 |"
    padded = _sweep_rows(result, [64], real_tokens=1000.0)
    assert padded[2].split(" | ")[7] == "x1.20" and padded[-1].split(" | ")[7] == "x1.00"
