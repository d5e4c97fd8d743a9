"""What the `ragfleet up` tests read from its output: lines as they come, and the banner's service pids."""

from __future__ import annotations

import queue
import re
import threading
import time
from typing import IO

BANNER_END = "Ctrl-C stops everything."
START_TIMEOUT = 120.0  # seconds for four services to report SERVING on a loaded 2-core machine


class Lines:
    """Reads a stream on a thread so the test can wait for a line with a timeout (or until the stream ends)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, needle: str, timeout: float = START_TIMEOUT) -> str:
        """Everything read so far, once a line containing `needle` has come; AssertionError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if needle in line:
                return "".join(self.seen)
        raise AssertionError(f"{needle!r} not printed within {timeout}s; got:\n{''.join(self.seen)}")


def banner_pids(banner: str) -> dict[str, int]:
    """{service: pid} from the banner `up` prints once all four are SERVING."""
    return {name: int(pid) for name, pid in re.findall(r"^  (\w+)\s+127\.0\.0\.1:\d+.*pid (\d+)$", banner, re.M)}
