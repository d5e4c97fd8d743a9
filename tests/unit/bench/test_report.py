"""bench/report.py's table from results files, and bench/ask_cost.py's targets beside the bare mesh floor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/ is scripts, not an installed package

from bench import report  # noqa: E402
from bench.ask_cost import beside_floor  # noqa: E402


def test_rows_show_value_floor_goal_and_source_or_say_what_is_missing(tmp_path: Path) -> None:
    targets = [{"name": "cached Ask p50 / bare 3-message stream p50 (x)", "value": 1.1, "goal": "<= 1.25x",
                "met": True, "floor": "bare 3-message stream p50 1.000 ms"},
               {"name": "concurrent streams held (...), this tree / baseline (x)", "value": 1.5, "goal": ">= 2x",
                "met": False, "floor": "main holds 200 (this tree 300)"}]
    (tmp_path / "gateway_bench.json").write_text(json.dumps({"when": "2026-12-03T00:00:00Z", "targets": targets,
                                                             "machine": {"cores": 2}, "figures": {}}))
    (tmp_path / "workers.json").write_text(json.dumps({"when": "2026-12-03T00:00:00Z", "figures": {}, "targets": [
        {"name": "gateway 2-over-1 workers ratio / bare ratio", "value": 0.95, "goal": ">= 0.9", "met": True}]}))
    body = report.render(tmp_path)
    assert ("| Cached Ask p50 <= 1.25x the bare 3-message stream | 1.10x | bare 3-message stream p50 1.000 ms | "
            "<= 1.25x | yes | [`gateway_bench`](bench/results/gateway_bench.md), 2026-12-03 |") in body
    assert "| 1.50x | main holds 200 (this tree 300) | >= 2x | **no** |" in body
    assert "| 0.95 | not in the results file | >= 0.9 | yes |" in body  # no floor in the figures: said so
    assert "| Mesh overhead on an uncached Ask <= 1.5x the bare four hops | not in the results file |" in body
    assert "| Tracing on at 100 % sampling: <= 15 % of the CPU per Ask | no results file yet |" in body
    assert "load.png" not in body and body == report.render(tmp_path)


def test_section_is_the_text_between_the_markers() -> None:
    readme = f"# x\n\n## Performance\n\n{report.BEGIN}\nbody\n{report.END}\n## next\n"
    assert report.section(readme) == "body"
    with pytest.raises(SystemExit):
        report.section("# no markers")


def test_ask_cost_targets_beside_the_floor_subtract_what_services_time_inside() -> None:
    mesh = ("embedding", "retrieval", "generation", "gateway")
    fixed = {"embedding": 2.0, "retrieval": 5.0, "generation": 3.0, "gateway": 4.0, "load generator": 1.0}
    inside = {"embedding": 0.0, "retrieval": 2.0}
    per_token = {"embedding": 0.0, "retrieval": 0.0, "generation": 200.0, "gateway": 250.0}
    floor = {"fixed": {"mesh_cpu_ms_per_ask": 6.0, "cpu_ms_per_ask": dict.fromkeys(mesh, 1.5)},
             "relay": {"mesh_us_per_token": 300.0, "per_token_us": dict.fromkeys(mesh, 75.0), "streams": 100,
                       "tokens_per_stream": 100, "deltas": 10000}}
    rows, (per_ask, per_tok) = beside_floor(fixed, inside, per_token, floor)
    assert per_ask["value"] == pytest.approx(12.0 / 6.0) and per_ask["met"]  # 14 ms in all, 2 timed inside
    assert per_tok["value"] == pytest.approx(450.0 / 300.0) and per_tok["met"]
    assert "bare mesh 6.00 ms per Ask" in per_ask["floor"] and any("**mesh (4 services)**" in r for r in rows)
