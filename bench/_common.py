"""Helpers every benchmark shares: machine facts, percentiles, and the results writer (json + md + png)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


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
