"""bench/load.py's schedule, mix and verdicts, and the bare mesh's shape (bench/_bare_mesh.py) on real processes."""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # bench/ is scripts, not an installed package

from bench import load  # noqa: E402
from bench._bare_mesh import BareMesh, ask, cpu_per_ask  # noqa: E402
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402


def test_poisson_arrivals_have_the_rate_and_stay_in_the_window() -> None:
    times = load.poisson_arrivals(50.0, 60.0, seed=1)
    assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < 60.0
    assert abs(len(times) / 60.0 - 50.0) < 3  # 3000 expected, sd ~55
    gaps = np.diff(times)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: coefficient of variation 1
    assert np.array_equal(times, load.poisson_arrivals(50.0, 60.0, seed=1))  # both trees get the same schedule


def test_mix_shares_and_novel_questions_never_repeat() -> None:
    work = load.Workload(hot=["h1", "h2"], novel=["n1", "n2", "n3"], repeat=0.45, followup=0.1, label="t")
    rng = random.Random(3)
    kinds: Counter[str] = Counter()
    novel = []
    for _ in range(4000):
        kind, request = work.request(rng)
        kinds[kind] += 1
        if kind == "novel":
            novel.append(request.question)
        elif kind == "followup":
            assert request.conversation_id.startswith("t-conversation-")
        else:
            assert request.question in ("h1", "h2") and not request.bypass_cache
    assert abs(kinds["repeated"] / 4000 - 0.45) < 0.03 and abs(kinds["followup"] / 4000 - 0.1) < 0.02
    assert len(set(novel)) == len(novel)  # a spent pool continues with numbered variants


def test_highest_sustainable_rate_and_the_floor_model() -> None:
    steps = {"5": {"offered_rate": 5.0, "sustainable": True}, "10": {"offered_rate": 10.0, "sustainable": True},
             "20": {"offered_rate": 20.0, "sustainable": False}}
    assert load.highest_sustainable(steps) == 10.0
    assert load.highest_sustainable({"5": {"offered_rate": 5.0, "sustainable": False}}) == 0.0
    floor = {"cached": {"mesh_cpu_ms_per_ask": 1.0}, "canned": {"mesh_cpu_ms_per_ask": 5.0},
             "relay": {"mesh_us_per_token": 500.0}}
    step = {"cache_statuses": {"CACHE_STATUS_HIT_EXACT": 1, "CACHE_STATUS_MISS": 1}, "deltas_per_uncached_answer": 11}
    assert load.floor_per_ask(floor, step) == pytest.approx(0.5 * 1.0 + 0.5 * (5.0 + 10 * 0.5))


def test_refinement_bisects_between_the_limit_and_the_next_rate_run() -> None:
    def steps(**verdicts: bool) -> dict[str, dict[str, object]]:
        return {rate[1:]: {"offered_rate": float(rate[1:]), "sustainable": ok} for rate, ok in verdicts.items()}

    grid = steps(r100=True, r200=True, r240=False, r280=False)
    assert load.next_refinement(grid, 10) == 220  # between 200 (the limit) and 240, not 280
    grid |= steps(r220=True)
    assert load.next_refinement(grid, 10) == 230
    grid |= steps(r230=False)
    assert load.next_refinement(grid, 10) is None  # 220..230: as narrow as asked
    assert load.highest_sustainable(grid) == 220
    assert load.next_refinement(steps(r100=True, r140=True), 10) is None  # nothing run above the limit
    assert load.next_refinement(steps(r100=False, r140=False), 10) is None  # no limit to refine from
    assert load.next_refinement(steps(r200=True, r240=False), 40) is None
    # A sustainable step above an unsustainable one: the bracket starts at the highest sustainable.
    assert load.next_refinement(steps(r200=True, r240=False, r280=True, r320=False), 10) == 300


@pytest.mark.slow
async def test_bare_mesh_answers_with_an_asks_shape() -> None:
    async with BareMesh() as mesh:  # canned deltas: no LLM behind generation
        async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            kinds = [e.WhichOneof("event") async for e in stub.Ask(gateway_pb2.AskRequest(
                question="q", bypass_cache=True, params={"max_tokens": 3}), timeout=10)]
            assert kinds == ["sources", "delta", "delta", "delta", "finished"]
            first, total, deltas, finished = await ask(stub, bypass_cache=True, max_tokens=2)
            assert deltas == 2 and 0 < first <= total
            assert finished is not None and finished.timings.embed_ms > 0 and finished.timings.retrieve_ms > 0
            cached = [e.WhichOneof("event") async for e in stub.Ask(gateway_pb2.AskRequest(question="q"), timeout=10)]
            assert cached == ["sources", "delta", "finished"]
        cost = await cpu_per_ask(mesh, 20, warmup=2)
        assert set(cost["cpu_ms_per_ask"]) == {"embedding", "retrieval", "generation", "gateway", "client"}
        assert cost["mesh_cpu_ms_per_ask"] > 0
