"""What the fault tests observe and do to service processes: SIGKILL, sockets, Prometheus metrics.

Connections are counted from /proc (no psutil): a process's socket inodes (/proc/<pid>/fd) matched against the
kernel's TCP table (/proc/<pid>/net/tcp{,6}), so only sockets this process holds are counted.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.cli.mesh import LocalMesh

TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING"}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_to(pid: int, remote_port: int) -> Counter[str]:
    """TCP connections process `pid` holds to 127.0.0.1:`remote_port` (any address family), by state."""
    inodes = _socket_inodes(pid)
    states: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            remote, state, inode = cols[2], cols[3], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                states[TCP_STATES.get(state, state)] += 1
    return states


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A service's /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when absent)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def sigkill(mesh: LocalMesh, name: str) -> None:
    proc = mesh.processes[name].process
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
