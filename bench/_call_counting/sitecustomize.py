"""Loaded by every Python process started with this folder on PYTHONPATH (bench/call_counts.py puts it there for the
services of one mesh): when BENCH_CALL_COUNTS_DIR is set and the process is a service (`python -m services.<name>`),
cProfile runs in its main thread; SIGUSR1 starts the count afresh, SIGUSR2 writes it to <dir>/<name>.prof."""

import os
import sys

_SERVICE = next((arg.split(".")[1] for arg in sys.orig_argv if arg.startswith("services.")), None)

if os.environ.get("BENCH_CALL_COUNTS_DIR") and _SERVICE:
    import cProfile
    import signal

    _profile = [cProfile.Profile()]
    _profile[0].enable()

    def _restart(*_: object) -> None:
        _profile[0].disable()
        _profile[0] = cProfile.Profile()
        _profile[0].enable()

    def _write(*_: object) -> None:
        _profile[0].disable()
        _profile[0].dump_stats(os.path.join(os.environ["BENCH_CALL_COUNTS_DIR"], f"{_SERVICE}.prof"))
        _profile[0].enable()

    signal.signal(signal.SIGUSR1, _restart)
    signal.signal(signal.SIGUSR2, _write)
