"""Pluggable rerank stage: one narrow interface, three implementations chosen by RAGFLEET_RETRIEVAL_RERANK.

- FusionRescorer (default): convex combination of min-max-normalised dense cosine and the max-normalised BM25
  score; no model needed, tuned by `alpha` on SciFact's train split. The cosine is the dense leg's own score where
  that leg returned the candidate, else computed from the stored vector (fetched for those candidates only).
- TeiReranker: POST {url}/rerank of a text-embeddings-inference compatible server ({"query", "texts"} ->
  [{"index", "score"}]).
- OnnxCrossEncoder: a cross-encoder exported to ONNX (`model.onnx` + `tokenizer.json`) from a directory the
  operator supplies; runs on a one-thread executor so the event loop never blocks.
"""

from __future__ import annotations

import abc
import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import httpx
import numpy as np

from services.retrieval.config import RerankConfig
from services.retrieval.models import Candidate
from services.runtime.errors import ConfigError, Unavailable


@dataclass(frozen=True)
class RerankQuery:
    text: str
    vector: np.ndarray | None
    # BM25 score of each candidate the sparse leg returned (absent = below the leg's cut, treated as 0).
    lexical: Mapping[str, float] = field(default_factory=dict)
    # Cosine of each candidate the dense leg returned (the engine's exact score for it).
    dense: Mapping[str, float] = field(default_factory=dict)


class Reranker(abc.ABC):
    name: str
    # Whether scores() reads Candidate.vector for candidates without a dense-leg score (the pipeline then fetches
    # the stored vectors of those candidates only).
    needs_vectors = False

    @abc.abstractmethod
    async def scores(self, query: RerankQuery, candidates: Sequence[Candidate]) -> list[float]:
        """One score per candidate, higher is better. Must not reorder or mutate `candidates`."""

    async def close(self) -> None:
        return None

    async def rerank(self, query: RerankQuery, candidates: Sequence[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        scores = await self.scores(query, candidates)
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])
        return [Candidate(candidates[i].point_id, float(scores[i]), candidates[i].payload, candidates[i].vector)
                for i in order]


def _minmax(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min()) if values.size else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


class FusionRescorer(Reranker):
    name = "fusion"
    needs_vectors = True

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    async def scores(self, query: RerankQuery, candidates: Sequence[Candidate]) -> list[float]:
        lexical = np.array([query.lexical.get(c.point_id, 0.0) for c in candidates], dtype=np.float32)
        top = float(lexical.max()) if lexical.size else 0.0
        lexical = lexical / top if top > 0 else lexical
        if query.vector is None:
            return lexical.tolist()
        q = query.vector / max(float(np.linalg.norm(query.vector)), 1e-12)
        cosines = []
        for c in candidates:
            score = query.dense.get(c.point_id)
            if score is None:
                if c.vector is None:
                    return lexical.tolist()
                score = float(c.vector @ q)
            cosines.append(score)
        dense = _minmax(np.asarray(cosines, dtype=np.float32))
        if top <= 0:
            return dense.tolist()
        return (self.alpha * dense + (1.0 - self.alpha) * lexical).tolist()


class TeiReranker(Reranker):
    name = "tei"

    def __init__(self, url: str, timeout_seconds: float) -> None:
        self.url = url.rstrip("/") + "/rerank"
        self._client = httpx.AsyncClient(timeout=timeout_seconds)

    async def scores(self, query: RerankQuery, candidates: Sequence[Candidate]) -> list[float]:
        body = {"query": query.text, "texts": [c.text for c in candidates], "truncate": True, "raw_scores": False}
        try:
            response = await self._client.post(self.url, json=body)
            response.raise_for_status()
            ranked = response.json()
            scores = [float("-inf")] * len(candidates)
            for item in ranked:
                scores[int(item["index"])] = float(item["score"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise Unavailable(f"reranker at {self.url} failed: {exc!r}") from exc
        return scores

    async def close(self) -> None:
        await self._client.aclose()


class OnnxCrossEncoder(Reranker):
    """(query, passage) pairs -> relevance logit. Feeds whichever of input_ids / attention_mask / token_type_ids
    the model declares, and reads the last logit column (single-logit and two-class heads both work)."""

    name = "onnx"

    def __init__(self, model_dir: str, *, max_length: int = 512) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_path, tokenizer_path = os.path.join(model_dir, "model.onnx"), os.path.join(model_dir, "tokenizer.json")
        for path in (model_path, tokenizer_path):
            if not os.path.isfile(path):
                raise ConfigError(f"RAGFLEET_RETRIEVAL_RERANK_MODEL_DIR: {path} is missing")
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cross-encoder")

    def _score(self, query: str, texts: list[str]) -> list[float]:
        encodings = self.tokenizer.encode_batch([(query, text) for text in texts])
        feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        logits = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        logits = np.asarray(logits, dtype=np.float32).reshape(len(texts), -1)
        return logits[:, -1].tolist()

    async def scores(self, query: RerankQuery, candidates: Sequence[Candidate]) -> list[float]:
        texts = [c.text for c in candidates]
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._score, query.text, texts)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)


def build_reranker(settings: RerankConfig) -> Reranker | None:
    if settings.kind == "none":
        return None
    if settings.kind == "tei":
        assert settings.url is not None
        return TeiReranker(settings.url, settings.timeout_seconds)
    if settings.kind == "onnx":
        assert settings.model_dir is not None
        return OnnxCrossEncoder(settings.model_dir)
    return FusionRescorer(settings.alpha)
