"""RRF, MMR and the token-budget cut on hand-made rankings."""

from __future__ import annotations

import numpy as np
import pytest

from services.retrieval.hybrid import count_tokens, mmr, rrf, token_budget
from services.retrieval.models import Candidate


def cand(pid: str, score: float = 0.0, vector=None, text: str = "") -> Candidate:
    return Candidate(pid, score, {"text": text}, None if vector is None else np.asarray(vector, dtype=np.float32))


def test_rrf_scores_follow_the_formula_and_reward_agreement():
    dense = [cand("a"), cand("b"), cand("c")]
    sparse = [cand("c"), cand("d"), cand("a")]
    fused = rrf([dense, sparse], k=60)
    scores = {c.point_id: c.score for c in fused}
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 63)
    assert scores["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert scores["b"] == pytest.approx(1 / 62) and scores["d"] == pytest.approx(1 / 62)
    assert [c.point_id for c in fused][:2] == ["a", "c"]  # in both lists beats either single list
    assert len(fused) == 4


def test_rrf_k_changes_how_much_top_ranks_dominate():
    dense = [cand("x"), cand("y")]
    sparse = [cand("y"), cand("z"), cand("w"), cand("x")]
    # Small k: being first in one list (x) loses to being 1st+2nd (y) either way, but the margin depends on k.
    small, large = rrf([dense, sparse], k=1), rrf([dense, sparse], k=1000)
    margin = lambda f: f[0].score - f[1].score  # noqa: E731
    assert small[0].point_id == large[0].point_id == "y"
    assert margin(small) > margin(large)


def test_rrf_keeps_a_vector_from_any_leg():
    fused = rrf([[cand("a")], [cand("a", vector=[1, 0])]], k=60)
    assert fused[0].vector is not None


def test_mmr_prefers_diverse_results():
    near_dup = [1.0, 0.0, 0.0]
    cands = [cand("a", 1.0, near_dup), cand("a2", 0.99, [0.999, 0.04, 0.0]), cand("b", 0.8, [0.0, 1.0, 0.0])]
    assert [c.point_id for c in mmr(np.array(near_dup), cands, lambda_=1.0, limit=2)] == ["a", "a2"]
    assert [c.point_id for c in mmr(np.array(near_dup), cands, lambda_=0.5, limit=2)] == ["a", "b"]


def test_mmr_limit_and_vectorless_candidates():
    cands = [cand("a", 1.0, [1, 0]), cand("n", 0.9), cand("b", 0.5, [0, 1])]
    out = mmr(None, cands, lambda_=0.7, limit=3)
    assert [c.point_id for c in out] == ["a", "b", "n"]
    assert mmr(None, cands, lambda_=0.7, limit=1)[0].point_id == "a"


def test_token_budget_cuts_in_order_and_keeps_at_least_one():
    hits = [cand("a", text="one two three"), cand("b", text="four five"), cand("c", text="six seven eight")]
    assert count_tokens("one, two.") == 4
    assert [c.point_id for c in token_budget(hits, 5)] == ["a", "b"]
    assert [c.point_id for c in token_budget(hits, 1)] == ["a"]
    assert token_budget(hits, 0) == hits
