"""The worker-process parts that need no process: the worker count, the CPU budget, the port reservation, exit
statuses (the processes themselves: tests/integration/test_workers.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.runtime.config import ServerConfig
from services.runtime.errors import ConfigError
from services.runtime.serve import server_options
from services.runtime.workers import (_cgroup_quota, available_cpus, exit_status, metrics_directory,
                                      remove_stale_metrics_directories, reserve_port)


@pytest.mark.parametrize("raw, workers", [("1", 1), ("4", 4), (" 2 ", 2), ("", 1)])
def test_the_worker_count_is_read_for_gateway_and_generation(raw: str, workers: int) -> None:
    for name in ("gateway", "generation"):
        assert ServerConfig.from_env(name, {f"RAGFLEET_{name.upper()}_WORKERS": raw}).workers == workers
    assert ServerConfig.from_env("embedding", {"RAGFLEET_EMBEDDING_WORKERS": "4"}).workers == 1  # not its variable


def test_auto_is_the_cpus_available() -> None:
    assert ServerConfig.from_env("gateway", {"RAGFLEET_GATEWAY_WORKERS": "AUTO"}).workers == available_cpus() >= 1


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_a_bad_worker_count_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="RAGFLEET_GENERATION_WORKERS"):
        ServerConfig.from_env("generation", {"RAGFLEET_GENERATION_WORKERS": raw})


def test_so_reuseport_only_for_workers() -> None:
    assert ("grpc.so_reuseport", 0) in server_options(ServerConfig("gateway"))
    assert ("grpc.so_reuseport", 1) in server_options(ServerConfig("gateway", workers=2))


@pytest.mark.parametrize("v2, v1, quota", [
    ("max 100000", None, None), ("150000 100000", None, 1.5), ("200000 100000\n", None, 2.0),
    (None, ("-1", "100000"), None), (None, ("300000", "100000"), 3.0), (None, None, None)])
def test_cgroup_quota(tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, quota: float | None) -> None:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0])
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1])
    assert _cgroup_quota(tmp_path) == quota


def test_exit_status_is_what_a_shell_shows() -> None:
    assert exit_status(0) == 0 and exit_status(3) == 3 and exit_status(-signal.SIGKILL) == 137


def test_a_reserved_port_admits_so_reuseport_servers_only() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    try:
        worker = grpc.server(None, options=[("grpc.so_reuseport", 1)])  # type: ignore[arg-type]
        assert worker.add_insecure_port(f"127.0.0.1:{port}") == port
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # any other program, or a server without SO_REUSEPORT
        worker.stop(0)
    finally:
        reserved.close()


def test_a_port_something_listens_on_is_refused() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(OSError, match="is the port in use"):
            reserve_port("127.0.0.1", listener.getsockname()[1])


def test_a_metrics_directory_is_kept_while_any_process_of_its_run_lives(tmp_path: Path) -> None:
    """The supervisor's lock on its run's directory passes to the workers it starts (as they inherit it); once the
    last of them is gone, SIGKILLed supervisor or not, the next start removes the directory."""
    path, lock = metrics_directory("gateway", root=str(tmp_path))
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(lock,))
    try:
        os.close(lock)  # the supervisor is gone; its worker still drains
        assert remove_stale_metrics_directories(str(tmp_path)) == [] and Path(path).is_dir()
    finally:
        worker.kill()
        worker.wait()
    assert remove_stale_metrics_directories(str(tmp_path)) == [path] and not Path(path).exists()


def test_the_sweep_leaves_running_runs_other_names_and_links_alone(tmp_path: Path) -> None:
    running, lock = metrics_directory("generation", root=str(tmp_path))
    old_style = tmp_path / "ragfleet-gateway-metrics-abc"  # an older supervisor's, which holds no lock: maybe live
    old_style.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "ragfleet-metrics-link").symlink_to(target)
    try:
        fresh, fresh_lock = metrics_directory("gateway", root=str(tmp_path))  # sweeps first
        os.close(fresh_lock)
        assert Path(running).is_dir() and old_style.is_dir() and target.is_dir()
        assert remove_stale_metrics_directories(str(tmp_path)) == [fresh]
    finally:
        os.close(lock)


def test_the_death_signal_is_armed_by_the_child_after_exec_not_by_a_preexec_fn(tmp_path):
    """A preexec_fn makes subprocess fork() instead of vfork, which runs gRPC's fork handlers in the child; now and
    then the child then aborted before exec (epoll_wait: Bad file descriptor). The child arms the signal itself."""
    import subprocess
    import sys

    from services.runtime.workers import DIE_WITH_PARENT_ENV, die_with_parent

    assert die_with_parent() == {DIE_WITH_PARENT_ENV: str(os.getpid())}
    probe = ("import os, sys; from services.runtime.workers import arm_parent_death_signal, DIE_WITH_PARENT_ENV as V;"
             "armed = arm_parent_death_signal(); print(armed, V in os.environ)")
    run = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **die_with_parent()}, capture_output=True,
                         text=True, timeout=60)
    assert run.stdout.split() == ["True", "False"]  # armed, and not passed on to its own children
    orphaned = subprocess.run([sys.executable, "-c", probe], env={**os.environ, DIE_WITH_PARENT_ENV: "1"},
                              capture_output=True, text=True, timeout=60)
    assert orphaned.returncode == 1 and orphaned.stdout == ""  # "its parent" is already gone: it exits at once
