"""The simulated OpenAI-compatible LLM (`ragfleet sim-llm`) as its own process, for every benchmark that needs one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from services.cli.sim_llm import SimLLMProcess


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SimProcess(SimLLMProcess):
    """The sim started with extra CLI flags (`SimProcess(["--max-tokens", "8"])`), and its CPU time."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        super().__init__(flags=args)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)
