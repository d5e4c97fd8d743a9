"""`ragfleet` imports only the subcommand it runs: `--help` and `ask` stay light."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import contextlib, io, sys
from services.cli import COMMANDS, main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(sys.argv[1:])
print(sorted(name for name, (module, _) in COMMANDS.items() if module in sys.modules))
"""


def loaded(*argv: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_help_loads_no_subcommand_and_a_subcommand_loads_only_itself():
    assert loaded("--help") == "[]"
    assert loaded("ask", "--help") == "['ask']"
    assert loaded("sim-llm", "--help") == "['sim-llm']"
