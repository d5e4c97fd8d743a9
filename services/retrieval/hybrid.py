"""Pure ranking steps of the search pipeline: reciprocal rank fusion, MMR and the token-budget cut.

Kept free of I/O so each is unit-tested on hand-made rankings:

    fused = rrf([dense_hits, sparse_hits], k=60)        # score = sum 1 / (k + rank)
    diverse = mmr(query_vec, fused, lambda_=0.7, limit=10)
    hits = token_budget(diverse, max_tokens=1500)
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from services.retrieval.models import Candidate

_TOKEN = re.compile(r"\w+|[^\w\s]")


def rrf(rankings: Sequence[Sequence[Candidate]], *, k: int, weights: Sequence[float] | None = None) -> list[Candidate]:
    """Fuse rankings by reciprocal rank (Cormack et al. 2009). Ties keep the first ranking's order.

    The first occurrence of a point supplies its payload and vector (any leg's copy is the same stored point).
    """
    weights = list(weights) if weights is not None else [1.0] * len(rankings)
    scores: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, cand in enumerate(ranking, start=1):
            scores[cand.point_id] = scores.get(cand.point_id, 0.0) + weight / (k + rank)
            if cand.point_id not in first or (first[cand.point_id].vector is None and cand.vector is not None):
                first[cand.point_id] = cand
    order = sorted(scores, key=lambda pid: -scores[pid])
    return [Candidate(pid, scores[pid], first[pid].payload, first[pid].vector) for pid in order]


def mmr(query: np.ndarray | None, candidates: Sequence[Candidate], *, lambda_: float, limit: int) -> list[Candidate]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998) over the candidates' stored unit vectors.

    Relevance is the candidate's current score min-max normalised (so MMR applies after any fusion or rerank), or
    the cosine to `query` when no scores differ; redundancy is the max cosine to what was already picked.
    Candidates without a vector keep their rank order after the diversified ones.
    """
    with_vec = [c for c in candidates if c.vector is not None]
    without = [c for c in candidates if c.vector is None]
    if not with_vec or limit <= 0:
        return list(candidates[:limit])
    vectors = np.stack([c.vector for c in with_vec]).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    scores = np.array([c.score for c in with_vec], dtype=np.float32)
    if np.ptp(scores) > 0:
        relevance = (scores - scores.min()) / np.ptp(scores)
    elif query is not None:
        relevance = vectors @ (query / max(np.linalg.norm(query), 1e-12))
    else:
        relevance = np.ones(len(with_vec), dtype=np.float32)
    similarity = vectors @ vectors.T
    chosen: list[int] = []
    remaining = list(range(len(with_vec)))
    redundancy = np.full(len(with_vec), -np.inf, dtype=np.float32)
    while remaining and len(chosen) < limit:
        if chosen:
            redundancy = np.maximum(redundancy, similarity[chosen[-1]])
            penalty = redundancy[remaining]
        else:
            penalty = np.zeros(len(remaining), dtype=np.float32)
        values = lambda_ * relevance[remaining] - (1.0 - lambda_) * penalty
        best = remaining[int(np.argmax(values))]
        chosen.append(best)
        remaining.remove(best)
    picked = [with_vec[i] for i in chosen]
    return (picked + without)[:limit]


def count_tokens(text: str) -> int:
    """Word-piece estimate (words and punctuation); close to BPE counts for English, and needs no vocabulary."""
    return len(_TOKEN.findall(text))


def token_budget(candidates: Sequence[Candidate], max_tokens: int) -> list[Candidate]:
    """Keep hits in order while their texts fit in `max_tokens`; always keep the first (a lone hit beats none)."""
    if max_tokens <= 0:
        return list(candidates)
    kept: list[Candidate] = []
    used = 0
    for cand in candidates:
        tokens = count_tokens(cand.text)
        if kept and used + tokens > max_tokens:
            break
        kept.append(cand)
        used += tokens
    return kept
