"""A service process serves on the event loop its config names (uvloop by default)."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime.config import ServerConfig
from services.runtime.serve import serve


class _Built(Exception):
    """Raised by the build step once it has seen the loop: ends serve() before any port is bound."""


@pytest.mark.parametrize(("event_loop", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_serve_runs_on_the_configured_loop(event_loop: str, module: str) -> None:
    seen: list[str] = []

    async def build():  # type: ignore[no-untyped-def]
        seen.append(type(asyncio.get_running_loop()).__module__)
        raise _Built

    with pytest.raises(_Built):
        serve(ServerConfig(component="probe", event_loop=event_loop), build)
    assert seen and seen[0].split(".")[0] == module
