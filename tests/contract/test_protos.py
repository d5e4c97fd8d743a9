"""The ragfleet.v1 contract: buf lint clean, no breaking change against the committed baseline, stubs fresh."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    """Binaries from the test extras live beside the interpreter (.venv/bin), which need not be on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found beside {sys.executable} or on PATH: install the test extras (pip install -e '.[test]')")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean() -> None:
    result = _run(_tool("buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_committed_baseline() -> None:
    # CI clones shallowly, so the baseline is a committed image (scripts/gen_protos.py --baseline), not git history.
    assert (ROOT / "protos" / "baseline.binpb").is_file()
    result = _run(_tool("buf"), "breaking", "--against", "protos/baseline.binpb")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_are_fresh() -> None:
    result = _run(sys.executable, "scripts/gen_protos.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_service_has_a_service_package() -> None:
    text = "\n".join(p.read_text() for p in (ROOT / "protos" / "ragfleet" / "v1").glob("*.proto"))
    services = {line.split()[1] for line in text.splitlines() if line.startswith("service ")}
    assert services == {"EmbeddingService", "RetrievalService", "GenerationService", "GatewayService"}
    for name in ("embedding", "retrieval", "generation", "gateway"):
        assert (ROOT / "services" / name / "__main__.py").is_file(), f"services/{name} is missing"


def test_buf_breaking_would_catch_a_renumbered_field(tmp_path: Path) -> None:
    """Proves the check has teeth: the same command fails on a copy of the protos with one field renumbered."""
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "protos" / "ragfleet" / "v1" / "gateway.proto"
    proto.write_text(proto.read_text().replace("string question = 1;", "string question = 99;", 1))
    result = subprocess.run([_tool("buf"), "breaking", "--against", "protos/baseline.binpb"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "question" in result.stdout + result.stderr
