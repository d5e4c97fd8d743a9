"""README.md's "Performance" section, generated from bench/results/*.json: every issue-12 target beside its floor.

    .venv/bin/python -m bench.report            # rewrite the section between its markers in README.md
    .venv/bin/python -m bench.report --check    # exit 1 if the README's section is not what the results give

Each row names the results file its figure comes from and the command that reproduces that file. A target's floor
is the `floor` the benchmark recorded beside it (gateway_bench, ask_cost), else what this module reads from that
file's figures; a row whose file or target is missing says so instead of failing. tests/contract/
test_performance_section.py keeps the committed README equal to what the committed results give.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench._common import RESULTS_DIR, ROOT

README = ROOT / "README.md"
BEGIN = "<!-- performance:begin -->"
END = "<!-- performance:end -->"
LOCK = "flock /tmp/ragfleet-bench.lock .venv/bin/python -m"
BASELINE = "/tmp/base"
# The checkout the same-run comparisons were made against ("today's main" when issue 12 was filed).
BASELINE_COMMIT = "2a1a619"
LOAD_HIGH_RATES = "100,160,200,240,280,320,360,400,440,480"  # past both trees' limits on 2026-12-04
COMMANDS = {
    # The sweep that reaches both trees' limits (the default rates stop at 100/s, below either's).
    "load_high": f"{LOCK} bench.load --baseline-tree {BASELINE} --rates {LOAD_HIGH_RATES} --max-minutes 20 "
                 "--name load_high --profile-rate 220",
    "ask_cost": f"{LOCK} bench.ask_cost",
    "coalescing": f"{LOCK} bench.coalescing",
    "gateway_bench": f"{LOCK} bench.gateway_bench --baseline-tree {BASELINE}",
    "tracing_cost": f"{LOCK} bench.tracing_cost",
    "embedding_bench": f"{LOCK} bench.embedding_bench",
    "workers": f"{LOCK} bench.workers",
}
Payload = dict[str, Any]


def _get(payload: Payload, *keys: Any) -> Any:
    """payload["figures"][k1][k2]... or None when any step is missing (another benchmark's layout may change)."""
    node: Any = payload.get("figures", {})
    for key in keys:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _rate_floor(payload: Payload, found: Payload) -> str | None:
    rates = _get(payload, "highest_sustainable_rate")
    if not isinstance(rates, dict) or "main" not in rates:
        return None
    return f"main {rates['main']:g} Asks/s (this tree {rates.get('new', float('nan')):g})"


def _coalescing_at_150(payload: Payload) -> dict[str, Payload]:
    """The coalescing summary's rows at 150 tokens/s, by mode ("on", "off")."""
    return {row.get("mode"): row for row in _get(payload, "summary") or [] if row.get("rate") == 150.0}


def _coalescing_floor(payload: Payload, found: Payload) -> str | None:
    rows = _coalescing_at_150(payload)
    if "off" not in rows:
        return None
    on = f", on {rows['on']['messages_per_token']:.2f}" if "on" in rows else ""
    return f"window off: {rows['off']['messages_per_token']:.2f} messages per token{on}"


def _coalescing_delay_floor(payload: Payload, found: Payload) -> str | None:
    rows = _coalescing_at_150(payload)
    if "off" not in rows or "on" not in rows:
        return None
    return (f"window off: p99 {rows['off']['added_delay_p99_ms']:.1f} ms (the path's own jitter), "
            f"on {rows['on']['added_delay_p99_ms']:.1f} ms")


def _tracing_floor(payload: Payload, found: Payload) -> str | None:
    off = _get(payload, "totals_ms", "off")
    if not isinstance(off, (int, float)):
        return None
    spread = _get(payload, "replica_spread")
    noise = f"; identical meshes differed by up to {max(spread.values()):.0%}" if isinstance(spread, dict) else ""
    return f"tracing off: {off:.2f} ms of mesh CPU per Ask{noise}"


def _ceiling_floor(payload: Payload, found: Payload) -> str | None:
    match = re.search(r"\(([^)]*texts/s)\)", found["name"])
    return f"in-process ceiling {match.group(1)}" if match else None


def _workers_floor(payload: Payload, found: Payload) -> str | None:
    bare = _get(payload, "bare_ratio")
    return f"bare grpc.aio 2-over-1 workers {bare:.3f}x" if isinstance(bare, (int, float)) else None


@dataclass(frozen=True)
class Row:
    """One issue-12 target: where its figure is (results file, target-name prefixes) and how to show its floor."""

    target: str
    results: str
    names: tuple[str, ...]
    floor: Callable[[Payload, Payload], str | None] | None = None  # (results, target) -> text; None: no floor

    def find(self, payload: Payload) -> Payload | None:
        for prefix in self.names:
            for entry in payload.get("targets", []):
                if entry["name"].startswith(prefix):
                    return entry
        return None

    def floor_text(self, payload: Payload, found: Payload) -> str:
        if "floor" in found:
            return str(found["floor"])
        if self.floor is None:
            return "none: a rate the seeds ask for"
        return self.floor(payload, found) or "not in the results file"


_AT_TARGET = "100 Asks/s for 60 s"
ROWS = (
    Row("Open loop, the mix, 100 Asks/s for 60 s: TTFT p50 <= 50 ms", "load_high",
        (f"{_AT_TARGET}: TTFT p50", _AT_TARGET)),
    Row("Open loop, the mix, 100 Asks/s for 60 s: TTFT p99 <= 300 ms", "load_high",
        (f"{_AT_TARGET}: TTFT p99", _AT_TARGET)),
    Row("Open loop, the mix, 100 Asks/s for 60 s: 0 errors", "load_high", (f"{_AT_TARGET}: errors", _AT_TARGET)),
    Row("Highest sustainable rate >= 2x today's main (same run)", "load_high", ("highest sustainable rate",),
        _rate_floor),
    Row("Mesh CPU per Ask outside model inference and the engine's search <= 2x the bare mesh", "ask_cost",
        ("mesh CPU per Ask outside",), None),
    Row("CPU per streamed token across the mesh <= 1.5x the bare relay", "ask_cost", ("mesh CPU per streamed token",),
        None),
    Row("Coalescing at 150 tokens/s: >= 2x fewer messages per token", "coalescing",
        ("150 tokens/s: messages per token",), _coalescing_floor),
    Row("Coalescing at 150 tokens/s: added delay per token p99 <= the window (20 ms), on minus off", "coalescing",
        ("150 tokens/s: added delay per token p99",), _coalescing_delay_floor),
    Row("Cached Ask p50 <= 1.25x the bare 3-message stream", "gateway_bench", ("cached Ask p50 /",), None),
    Row("Mesh overhead on an uncached Ask <= 1.5x the bare four hops", "gateway_bench",
        ("mesh overhead on an uncached Ask",), None),
    Row("Embedding cache hit through gRPC <= 1.3x a bare unary round trip", "gateway_bench",
        ("embedding cache hit through gRPC",), None),
    Row("Tracing on at 100 % sampling: <= 15 % of the CPU per Ask", "tracing_cost", ("tracing on",), _tracing_floor),
    Row("Embedding: 64 concurrent single-text callers >= 0.95 of the in-process ceiling", "embedding_bench",
        ("local: 64 callers / ceiling",), _ceiling_floor),
    Row("Concurrent streams held (added TTFT p99 <= 100 ms) >= 2x today's main", "gateway_bench",
        ("concurrent streams held",), None),
    Row("Two gateway workers over one >= 0.9x two bare grpc.aio workers over one", "workers",
        ("gateway 2-over-1 workers",), _workers_floor),
)


def _value(entry: Payload) -> str:
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    name = entry["name"]
    if "%" in str(entry["goal"]):
        return f"{value:.0%}"
    if name.endswith("(x)"):
        return f"{value:.2f}x"
    if name.endswith("(ms)"):
        return f"{value:.1f} ms"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def load_results(results_dir: Path) -> dict[str, Payload]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))}


def render(results_dir: Path = RESULTS_DIR) -> str:
    """The section's body (between the markers), from the results files alone: the same files, the same text."""
    results = load_results(results_dir)
    cores = sorted({p["machine"]["cores"] for name, p in results.items() if name in COMMANDS and "machine" in p})
    intro = (f"Issue 12's targets, each measured on the reference machine ({'/'.join(map(str, cores))} cores, shared "
             "by the services and the load generator) beside its floor in the same run: the bare-gRPC floor "
             "(bench/_bare_mesh.py: four grpc.aio processes with an Ask's shapes, doing no work) or today's main "
             f"(commit `{BASELINE_COMMIT}`) run interleaved with this tree. Generated by `.venv/bin/python -m "
             "bench.report` from `bench/results/*.json` (a contract test keeps it equal to them); each file's `.md` "
             "has the full tables.")
    lines = [*textwrap.wrap(intro, 118, break_on_hyphens=False), "",
             "| target (issue 12) | value | floor (same run) | goal | met | results |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        payload = results.get(row.results)
        found = row.find(payload) if payload is not None else None
        source = f"[`{row.results}`](bench/results/{row.results}.md)"
        if payload is None or found is None:
            why = "no results file yet" if payload is None else "not in the results file"
            lines.append(f"| {_cell(row.target)} | {why} | | | | {source} |")
            continue
        lines.append(f"| {_cell(row.target)} | {_cell(_value(found))} | {_cell(row.floor_text(payload, found))} | "
                     f"{_cell(str(found['goal']))} | {'yes' if found['met'] else '**no**'} | {source}, "
                     f"{payload.get('when', '')[:10]} |")
    if (results_dir / "load_high.png").exists():
        lines += ["", "Latency against offered load (open loop, the mix; bench/load.py, this tree and today's main in "
                      "the same run):", "", "![TTFT and total latency against offered load](bench/results/load_high.png)"]
    reproduce = ("Reproduce a row: run the command of its results file from the repository root (`.[bench]` "
                 f"installed; `{BASELINE}` a checkout of the baseline: `git worktree add {BASELINE} "
                 f"{BASELINE_COMMIT}`), then regenerate this section with `.venv/bin/python -m bench.report`:")
    lines += ["", *textwrap.wrap(reproduce, 118, break_on_hyphens=False), "", "```bash"]
    for name in dict.fromkeys(row.results for row in ROWS):
        rows = sum(row.results == name for row in ROWS)
        lines.append(f"{COMMANDS[name]:<96} # {name}.json: {rows} row{'s' if rows > 1 else ''}")
    lines += ["```"]
    return "\n".join(lines)


def _bounds(readme: str) -> tuple[int, int]:
    try:
        start = readme.index(BEGIN) + len(BEGIN)
        return start, readme.index(END, start)
    except ValueError:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers") from None


def section(readme: str) -> str:
    """The README's text between the markers (without them and the newlines beside them)."""
    start, end = _bounds(readme)
    return readme[start:end].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the section is stale")
    args = parser.parse_args(argv)
    readme, body = README.read_text(), render()
    current = section(readme)
    if args.check:
        if current != body:
            print("README.md's Performance section is stale: run .venv/bin/python -m bench.report", file=sys.stderr)
            return 1
        return 0
    if current != body:
        start, end = _bounds(readme)
        README.write_text(f"{readme[:start]}\n{body}\n{readme[end:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
