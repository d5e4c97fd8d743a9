"""One real mesh for the fuzz tests (FuzzMesh: four services, Redis, API keys, semantic cache, sim LLM), and the
Hypothesis profiles: "ci" (default; a short run that fits ~60 s on a busy 2-core machine) and "long".

    RAGFLEET_FUZZ_PROFILE=long .venv/bin/python -m pytest -q tests/fuzz     # many more cases per RPC
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.harness import FuzzMesh

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.large_base_example])
settings.register_profile("ci", max_examples=int(os.environ.get("RAGFLEET_FUZZ_EXAMPLES", "50")), **_COMMON)
settings.register_profile("long", max_examples=500, **_COMMON)


@pytest.fixture(scope="session")
def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzMesh]:
    fm = FuzzMesh.start(tmp_path_factory.mktemp("fuzz-mesh"))
    try:
        yield fm
    finally:
        fm.stop()
