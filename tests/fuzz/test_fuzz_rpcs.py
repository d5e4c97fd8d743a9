"""Property-based fuzzing of every public RPC over real gRPC against a real mesh (issue 10).

For each RPC: requests generated from the proto descriptor, and valid requests corrupted on the wire. A client
mistake must never answer UNKNOWN or INTERNAL (at the caller, or counted by any service behind it), every call
must end with a status before its deadline, and every service must still be SERVING afterwards.
The number of cases comes from the Hypothesis profile (tests/fuzz/conftest.py); bench/fuzz.py runs thousands.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import FuzzMesh, Target
from tests.fuzz.strategies import mutations

PROFILE = settings.get_profile(os.environ.get("RAGFLEET_FUZZ_PROFILE", "ci"))
RPCS = ["GatewayService/Ask", "GatewayService/Ingest", "GatewayService/DeleteDocuments", "EmbeddingService/Embed",
        "RetrievalService/Upsert", "RetrievalService/Delete", "RetrievalService/Search",
        "GenerationService/Generate"]
HEALTH_EVERY = 20


def _check_after(fm: FuzzMesh, before: Counter[Any], codes: Counter[str], name: str) -> None:
    health = fm.health()
    assert set(health.values()) == {"SERVING"}, f"after fuzzing {name}: {health}\n{fm.logs_tail()}"
    new = fm.server_errors() - before
    assert not new, f"services counted UNKNOWN/INTERNAL RPCs while fuzzing {name}: {dict(new)}"
    assert sum(codes.values()) > 0


def _run_case(fm: FuzzMesh, target: Target, payload: bytes, codes: Counter[str]) -> None:
    outcome = fm.call(target, payload)
    codes[outcome.code] += 1
    problems = outcome.violations(target)
    assert not problems, f"{target.name}: {problems} for {len(payload)} bytes {payload[:200]!r}"
    if sum(codes.values()) % HEALTH_EVERY == 0:
        health = fm.health()
        assert set(health.values()) == {"SERVING"}, f"{target.name}: {health}\n{fm.logs_tail()}"


@pytest.mark.slow
@pytest.mark.parametrize("name", RPCS)
def test_generated_requests(fuzz_mesh: FuzzMesh, name: str) -> None:
    target = fuzz_mesh.targets[name]
    before, codes = fuzz_mesh.server_errors(), Counter[str]()

    @settings(PROFILE)
    @given(message=target.requests())
    def case(message: Any) -> None:
        _run_case(fuzz_mesh, target, message.SerializeToString(), codes)

    case()
    _check_after(fuzz_mesh, before, codes, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", RPCS)
def test_corrupted_bytes(fuzz_mesh: FuzzMesh, name: str) -> None:
    target = fuzz_mesh.targets[name]
    before, codes = fuzz_mesh.server_errors(), Counter[str]()
    seeds = st.one_of(st.sampled_from([s.SerializeToString() for s in target.seeds]),
                      target.requests(huge_chars=2000).map(lambda m: m.SerializeToString()))

    @settings(PROFILE)
    @given(mutated=mutations(seeds, target.string_fields))
    def case(mutated: tuple[str, bytes]) -> None:
        _run_case(fuzz_mesh, target, mutated[1], codes)

    case()
    _check_after(fuzz_mesh, before, codes, name)


@pytest.mark.slow
def test_gateway_authorization_values(fuzz_mesh: FuzzMesh) -> None:
    """Any authorization header value the transport allows is refused with UNAUTHENTICATED, never an error."""
    target = fuzz_mesh.targets["GatewayService/Ask"]
    payload = target.seeds[0].SerializeToString()
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
    values = st.one_of(printable, printable.map(lambda s: "Bearer " + s), st.just("Bearer"), st.just("bearer  "))

    @settings(PROFILE, max_examples=min(PROFILE.max_examples, 40))
    @given(value=values)
    def case(value: str) -> None:
        if value.strip() == f"Bearer {fuzz_mesh.api_key}":
            return
        outcome = fuzz_mesh.call(target, payload, metadata=(("authorization", value),))
        assert outcome.code == "UNAUTHENTICATED", (value, outcome)

    case()

