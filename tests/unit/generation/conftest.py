"""A simulated LLM in the test's event loop, with its control endpoints, for the generation unit tests."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.cli import sim_llm


class SimHandle:
    def __init__(self, port: int, control: httpx.AsyncClient) -> None:
        self.llm_url = f"http://127.0.0.1:{port}/v1"
        self._control = control

    async def configure(self, **changes: object) -> None:
        (await self._control.post("/_sim/config", json=changes)).raise_for_status()

    async def stats(self) -> dict:
        return (await self._control.get("/_sim/stats")).json()

    async def wait_disconnected(self, timeout: float = 2.0) -> dict:
        """Stats once the sim has seen one client disconnect and no stream is left running (or at the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = await self.stats()
            if (stats["disconnects"] >= 1 and stats["active_streams"] == 0) or loop.time() > deadline:
                return stats
            await asyncio.sleep(0.01)


@pytest.fixture
async def sim():
    runner, port = await sim_llm.start(sim_llm.SimConfig(ttft_ms=10, tokens_per_second=1000, max_tokens=10))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as control:
        try:
            yield SimHandle(port, control)
        finally:
            await runner.cleanup()
