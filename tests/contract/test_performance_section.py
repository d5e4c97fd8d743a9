"""README.md's "Performance" section is what bench.report generates from the committed bench/results, so it cannot
go stale: rerun a benchmark, then `.venv/bin/python -m bench.report`, and commit both."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is run from the repository root, not installed

from bench import report  # noqa: E402


def test_the_performance_section_is_generated_from_the_results() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Performance\n" in readme
    assert report.section(readme) == report.render(), "stale: run .venv/bin/python -m bench.report"


def test_every_issue_12_target_has_a_row_and_a_command() -> None:
    body = report.render()
    for row in report.ROWS:
        assert f"| {row.target} |" in body
        assert report.COMMANDS[row.results] in body
    assert "(bench/results/load_high.png)" in body  # the latency-vs-load plot of the sweep past both limits
