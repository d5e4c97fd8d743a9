"""The generation service with a slow worker 1, for tests/integration/test_workers.py: run as
``python -c "from tests.integration._slow_worker import run; run()"`` (the workers import this module by name, so
not as ``__main__``). Worker 1 takes RAGFLEET_TEST_SLOW_BUILD_SECONDS longer to build; each worker touches
``built-<index>`` in RAGFLEET_TEST_BUILT_DIR once its service is built."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from services.generation.server import SERVICE, build as build_generation
from services.generation.config import GenerationConfig
from services.runtime.serve import Started, main


async def build(config: GenerationConfig) -> Started:
    index = sys.argv[2]  # python -m services.runtime._worker <module> <index> <fd>
    started = await build_generation(config)
    if index == "1":
        await asyncio.sleep(float(os.environ["RAGFLEET_TEST_SLOW_BUILD_SECONDS"]))
    (Path(os.environ["RAGFLEET_TEST_BUILT_DIR"]) / f"built-{index}").touch()
    return started


def run() -> None:
    sys.exit(main(SERVICE, build))
