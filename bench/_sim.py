"""The simulated OpenAI-compatible LLM (`ragfleet sim-llm`) as its own process, for every benchmark that needs one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from services.cli.mesh import free_port

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SimProcess:
    """Starts `python -m services.cli sim-llm` on a free port (extra CLI args passed through) and waits for it."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "sim-llm", "--port", str(self.port), *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.control("/_sim/stats")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("sim-llm did not start") from None
                time.sleep(0.1)

    def control(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def configure(self, settings: dict[str, Any]) -> None:
        self.control("/_sim/config", settings)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
