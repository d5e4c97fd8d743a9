"""Query variants for multi-query retrieval, and reciprocal-rank fusion (RRF) of their hit lists.

Variants are made without an LLM so they cost nothing on the hot path: the question itself, then its content words
(drops the question's function words, which dilute both BM25 and the embedding).

    rrf_merge([hits_a, hits_b], top_k=5)   # chunks ranked high in several lists rise
"""

from __future__ import annotations

import re
from typing import Sequence

from services.runtime.pb.ragfleet.v1 import retrieval_pb2

RRF_K = 60  # the constant from Cormack et al. (2009); damps the weight of the very top ranks

_STOPWORDS = frozenset("""a an and are as at be by can could did do does for from had has have how i in is it its of
on or should that the their there these this to was were what when where which who whom whose why will with would
you your me my we our tell explain describe about please""".split())
_WORD_RE = re.compile(r"\w+")


def query_variants(question: str, limit: int) -> list[str]:
    """Up to `limit` distinct search queries, the question first."""
    variants = [question]
    if limit <= 1:  # the default: no keyword variant to make (the regex and the join cost ~5 us an Ask)
        return variants
    keywords = " ".join(w for w in _WORD_RE.findall(question.lower()) if w not in _STOPWORDS)
    if keywords and keywords != question.lower().strip():
        variants.append(keywords)
    return variants[:max(1, limit)]


def rrf_merge(hit_lists: Sequence[Sequence[retrieval_pb2.SearchHit]], *, top_k: int) -> list[retrieval_pb2.SearchHit]:
    """Fuse ranked lists by sum of 1/(RRF_K + rank); a chunk keeps its best original score for display."""
    if len(hit_lists) == 1:
        return list(hit_lists[0])[:top_k]
    fused: dict[str, float] = {}
    best: dict[str, retrieval_pb2.SearchHit] = {}
    for hits in hit_lists:
        for rank, hit in enumerate(hits, start=1):
            fused[hit.chunk_id] = fused.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank)
            if hit.chunk_id not in best or hit.score > best[hit.chunk_id].score:
                best[hit.chunk_id] = hit
    order = sorted(fused, key=lambda chunk_id: fused[chunk_id], reverse=True)
    return [best[chunk_id] for chunk_id in order[:top_k]]
