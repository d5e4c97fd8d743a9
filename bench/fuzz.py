"""Long fuzz run (issue 10): thousands of cases per public RPC against a real mesh, every status recorded.

The same harness and strategies as tests/fuzz (requests generated from the proto descriptors, plus wire-level
corruptions of valid requests), but nothing stops at the first failure: each case's status is counted per RPC,
and each violation (UNKNOWN/INTERNAL/DATA_LOSS, no status within the deadline, a service not SERVING) is kept with
the smallest payload that showed it, for the owners to reproduce.

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench.fuzz                  # >= 2000 cases per RPC
    .venv/bin/python -m bench.fuzz --quick                                         # 100 per RPC, *_quick results

Writes bench/results/fuzz.{json,md,png} and the findings to /tmp/fuzz_findings.md.
"""

from __future__ import annotations

import argparse
import sys
import threading
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench._common import write_results
from tests.fuzz.harness import FORBIDDEN, FuzzMesh, Target
from tests.fuzz.strategies import mutations

HEALTH_EVERY = 50
FINDINGS = Path("/tmp/fuzz_findings.md")


class Recorder:
    """Counts per RPC and status; keeps the smallest payload per (RPC, violation)."""

    def __init__(self) -> None:
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.kinds: dict[str, Counter[str]] = defaultdict(Counter)
        self.violations: dict[tuple[str, str], dict[str, Any]] = {}
        self.unhealthy: list[dict[str, Any]] = []
        self.max_elapsed: dict[str, float] = defaultdict(float)
        self.cases: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, fm: FuzzMesh, target: Target, kind: str, payload: bytes) -> None:
        outcome = fm.call(target, payload)
        with self._lock:
            self._record(fm, target, kind, payload, outcome)

    def _record(self, fm: FuzzMesh, target: Target, kind: str, payload: bytes, outcome: Any) -> None:
        name = target.name
        self.cases[name] += 1
        self.codes[name][outcome.code] += 1
        self.kinds[name][kind] += 1
        self.max_elapsed[name] = max(self.max_elapsed[name], outcome.elapsed)
        for problem in outcome.violations(target):
            key = (name, problem.split(":", 1)[0] if outcome.code in FORBIDDEN else "deadline")
            seen = self.violations.get(key)
            if seen is None or len(payload) < len(seen["payload"]):
                self.violations[key] = {"rpc": name, "kind": kind, "code": outcome.code, "problem": problem,
                                        "payload": payload, "decodes": target.decodes(payload),
                                        "count": (seen or {}).get("count", 0)}
            self.violations[key]["count"] += 1
        if self.cases[name] % HEALTH_EVERY == 0:
            health = fm.health()
            if set(health.values()) != {"SERVING"}:
                self.unhealthy.append({"rpc": name, "case": self.cases[name], "health": health})


def fuzz_rpc(fm: FuzzMesh, target: Target, rec: Recorder, generated: int, mutated: int, huge_chars: int) -> None:
    base = dict(deadline=None, database=None, phases=(Phase.generate,),
                suppress_health_check=list(HealthCheck))

    @settings(max_examples=generated, **base)
    @given(message=target.requests(huge_chars=huge_chars))
    def gen_case(message: Any) -> None:
        rec.record(fm, target, "generated", message.SerializeToString())

    seeds = st.one_of(st.sampled_from([s.SerializeToString() for s in target.seeds]),
                      target.requests(huge_chars=2000).map(lambda m: m.SerializeToString()))

    @settings(max_examples=mutated, **base)
    @given(mutated=mutations(seeds, target.string_fields))
    def mut_case(mutated: tuple[str, bytes]) -> None:
        rec.record(fm, target, mutated[0], mutated[1])

    gen_case()
    mut_case()


def _shown(payload: bytes, target: Target) -> str:
    if target.decodes(payload):
        from google.protobuf import text_format

        text = text_format.MessageToString(target.request_cls.FromString(payload), as_utf8=True)
        return "decoded:\n```\n" + text[:1500] + ("..." if len(text) > 1500 else "") + "\n```"
    return f"raw ({len(payload)} bytes): `{payload[:300]!r}`"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=int, default=1200, help="generated requests per RPC")
    parser.add_argument("--mutated", type=int, default=800, help="corrupted requests per RPC")
    parser.add_argument("--huge-chars", type=int, default=200_000, help="longest generated string")
    parser.add_argument("--rpc", action="append", help="only these RPCs (e.g. GatewayService/Ask); repeatable")
    parser.add_argument("--workers", type=int, default=4, help="RPCs fuzzed at once (one Hypothesis run each)")
    parser.add_argument("--quick", action="store_true", help="100 cases per RPC, results as fuzz_quick")
    args = parser.parse_args()
    if args.quick:
        args.generated, args.mutated, args.huge_chars = 60, 40, 20_000
    rec = Recorder()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ragfleet-fuzz-") as tmp, FuzzMesh.start(Path(tmp), timeout=30) as fm:
        before = fm.server_errors()
        names = args.rpc or list(fm.targets)

        def one(name: str) -> None:
            t0 = time.monotonic()
            fuzz_rpc(fm, fm.targets[name], rec, args.generated, args.mutated, args.huge_chars)
            print(f"{name}: {rec.cases[name]} cases in {time.monotonic() - t0:.0f}s {dict(rec.codes[name])}",
                  flush=True)

        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            for future in [pool.submit(one, name) for name in names]:
                future.result()
        final_health = fm.health()
        server_side = fm.server_errors() - before
        targets_by_name = {n: fm.targets[n] for n in names}
    elapsed = time.monotonic() - started

    forbidden = sum(c for codes in rec.codes.values() for code, c in codes.items() if code in FORBIDDEN)
    forbidden_total = forbidden + sum(server_side.values())
    late = sum(v["count"] for (_, k), v in rec.violations.items() if k == "deadline")
    not_serving = len(rec.unhealthy) + (0 if set(final_health.values()) == {"SERVING"} else 1)
    fewest = min(rec.cases.values()) if rec.cases else 0
    targets = [
        {"name": "UNKNOWN or INTERNAL for client mistakes", "value": forbidden_total, "goal": 0,
         "met": forbidden_total == 0},
        {"name": "calls without a status within their deadline", "value": late, "goal": 0, "met": late == 0},
        {"name": "health checks not SERVING (every 50 cases and at the end)", "value": not_serving, "goal": 0,
         "met": not_serving == 0},
        {"name": "fewest cases for one RPC", "value": fewest, "goal": 2000, "met": fewest >= 2000},
    ]
    figures = {
        "cases_per_rpc": dict(rec.cases),
        "codes_per_rpc": {n: dict(c) for n, c in rec.codes.items()},
        "case_kinds_per_rpc": {n: dict(c) for n, c in rec.kinds.items()},
        "max_call_seconds_per_rpc": {n: round(v, 3) for n, v in rec.max_elapsed.items()},
        "client_forbidden_statuses": forbidden,
        "server_side_forbidden_statuses": {f"{s} {m} {c}": n for (s, m, c), n in server_side.items()},
        "unhealthy": rec.unhealthy,
        "final_health": final_health,
        "findings": [{k: (v if k != "payload" else v[:200].hex()) for k, v in f.items()}
                     for f in rec.violations.values()],
        "elapsed_seconds": round(elapsed, 1),
    }
    rows = ["| RPC | cases | " + " | ".join(["OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "other"]) + " |",
            "|---|---|---|---|---|---|"]
    for n, codes in rec.codes.items():
        other = {c: k for c, k in codes.items() if c not in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")}
        rows.append(f"| {n} | {rec.cases[n]} | {codes.get('OK', 0)} | {codes.get('INVALID_ARGUMENT', 0)} | "
                    f"{codes.get('RESOURCE_EXHAUSTED', 0)} | {other or ''} |")
    findings = ["# Fuzz findings (bench/fuzz.py)", "", f"{sum(rec.cases.values())} cases, {elapsed:.0f}s.", ""]
    if not rec.violations and not server_side and not not_serving:
        findings.append("No violations.")
    for f in rec.violations.values():
        findings += [f"## {f['rpc']}: {f['problem'][:200]}", "",
                     f"- seen {f['count']} times; smallest case: {f['kind']}, decodes locally: {f['decodes']}",
                     "- " + _shown(f["payload"], targets_by_name[f["rpc"]]), ""]
    if server_side:
        findings += ["## counted by the services (ragfleet_rpc_requests_total)", ""]
        findings += [f"- {s} {m}: {c} x{n}" for (s, m, c), n in server_side.items()]
    if rec.unhealthy or not_serving:
        findings += ["## health", "", f"- {rec.unhealthy} final: {final_health}"]
    FINDINGS.write_text("\n".join(findings) + "\n")

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        codes = sorted({c for cs in rec.codes.values() for c in cs})
        names_ = list(rec.codes)
        fig, ax = plt.subplots(figsize=(10, 5))
        bottom = [0] * len(names_)
        for code in codes:
            values = [rec.codes[n].get(code, 0) for n in names_]
            ax.barh(names_, values, left=bottom, label=code)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xlabel("cases")
        ax.set_title("fuzz: status per RPC")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    notes = [f"{args.generated} generated + {args.mutated} corrupted requests per RPC; strings up to "
             f"{args.huge_chars} characters; every call with a {fm.targets[names[0]].timeout:.0f}s deadline",
             "mesh: four services, Redis, API keys, semantic cache, sim LLM (no fallback); findings in "
             f"{FINDINGS}"]
    write_results("fuzz_quick" if args.quick else "fuzz", figures=figures, targets=targets,
                  markdown="\n".join(rows), plot=plot, notes=notes)
    print(f"done in {elapsed:.0f}s; forbidden statuses {forbidden_total}, late {late}, not serving {not_serving}")
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
