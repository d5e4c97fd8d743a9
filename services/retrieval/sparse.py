"""BM25 sparse vectors: Qdrant's own BM25 tokenizer/stemmer, stored as a sparse vector with the IDF modifier.

Documents carry term-frequency weights saturated by (k1, b, avg_len); queries carry 1.0 per unique term; the engine
multiplies by IDF at search time (computed over the caller's tenant only), which together is BM25.
The same encoder feeds both stores, so the embedded engine and a Qdrant server score identically.
"""

from __future__ import annotations

import qdrant_edge

from services.retrieval.config import Bm25Config
from services.retrieval.models import SparseVec


class Bm25Encoder:
    def __init__(self, settings: Bm25Config) -> None:
        self._model = qdrant_edge.Bm25(qdrant_edge.Bm25Config(k=settings.k1, b=settings.b, avg_len=settings.avg_len,
                                                              language="english"))

    def document(self, text: str) -> SparseVec:
        vec = self._model.embed_document(text)
        return SparseVec(list(vec.indices), list(vec.values))

    def query(self, text: str) -> SparseVec:
        vec = self._model.embed_query(text)
        return SparseVec(list(vec.indices), list(vec.values))
