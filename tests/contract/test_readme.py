"""The README's promises: two opening commands, CI running the test one verbatim, every variable documented."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from services.runtime.config import ServerConfig

from ._config_vars import SERVICES, load_all

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI = ROOT / ".ci" / "run"
SERVER_SUFFIXES = ("HOST", "PORT", "METRICS_PORT", "GRACE_SECONDS", "DRAIN_NOTICE_SECONDS", "MAX_CONNECTION_AGE_SECONDS",
                   "MAX_CONNECTION_AGE_GRACE_SECONDS", "KEEPALIVE_SECONDS", "MAX_MESSAGE_MB")
VARIABLE = re.compile(r"RAGFLEET_[A-Z0-9_]*[A-Z0-9]")


def opening_commands() -> list[str]:
    """The fenced code blocks before the first second-level heading."""
    intro = README.split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", intro, re.S)]


def ci_test_command() -> str:
    match = re.search(r'^README_TEST_COMMAND="(.*)"$', CI.read_text(), re.M)
    assert match, ".ci/run must define README_TEST_COMMAND"
    return match.group(1)


def test_readme_opens_with_exactly_two_one_line_commands() -> None:
    commands = opening_commands()
    assert len(commands) == 2, commands
    run, test = commands
    assert all("\n" not in command for command in commands)
    assert run.startswith("python3 -m venv .venv && ") and run.endswith("ragfleet demo")
    assert "pip install -e ." in run
    assert "'.[test]'" in test and test.endswith("-m pytest -q")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    assert ci_test_command() == opening_commands()[1]
    text = CI.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert 'bash -c "$README_TEST_COMMAND"' in text
    assert os.access(CI, os.X_OK), ".ci/run must be executable"


def _documented() -> set[str]:
    return set(VARIABLE.findall(README))


def _normalise(name: str) -> str:
    """RAGFLEET_EMBEDDING_GRACE_SECONDS -> RAGFLEET_<SERVICE>_GRACE_SECONDS (the README documents these once)."""
    for service in SERVICES:
        prefix = f"RAGFLEET_{service.upper()}_"
        if name.startswith(prefix) and name.removeprefix(prefix) in SERVER_SUFFIXES:
            return f"RAGFLEET_<SERVICE>_{name.removeprefix(prefix)}"
    return name


def _code_literals() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        if "pb" in path.relative_to(ROOT).parts:
            continue
        names |= {n for n in VARIABLE.findall(path.read_text()) if n.removeprefix("RAGFLEET_").lower() not in SERVICES
                  and n != "RAGFLEET_LLM"}
    return names


def test_every_variable_the_services_read_is_in_the_readme_table() -> None:
    _, consulted = load_all({})
    for service in SERVICES:
        from ._config_vars import RecordingEnviron

        environ = RecordingEnviron()
        ServerConfig.from_env(service, environ)
        consulted |= {key for key in environ.seen if key.startswith("RAGFLEET_")}
    readme = README
    missing = sorted(name for name in consulted | _code_literals()
                     if _normalise(name) not in readme and name not in readme)
    assert not missing, f"RAGFLEET_* variables read by the code but missing from the README table: {missing}"


def test_the_readme_documents_no_variable_that_nothing_reads() -> None:
    config_sources = "\n".join((ROOT / "services" / s / "config.py").read_text() for s in SERVICES)
    known = _code_literals()
    stale = []
    for name in _documented():
        suffix = name.split("_", 2)[-1] if name.count("_") >= 2 else name
        if name in known or f'"{suffix}"' in config_sources or f'"{name.split("_", 1)[1]}"' in config_sources:
            continue
        stale.append(name)
    assert not stale, f"documented but read nowhere (renamed?): {sorted(stale)}"


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_its_own_variable_table(service: str) -> None:
    assert f"\n**{service}**\n\n| variable | default | meaning |" in README

