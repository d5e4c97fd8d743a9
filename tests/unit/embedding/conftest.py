"""Fixtures for embedding unit tests: the real ONNX backend (loaded once), a scripted backend passed in through the
EmbeddingBackend interface for batching policy tests, Redis clean-up, and SciFact texts of varied length."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from services.embedding.backends.base import EmbeddingBackend, PreparedText, l2_normalise
from services.embedding.backends.onnx import OnnxBackend
from services.embedding.config import OnnxConfig

SCIFACT = Path("/work/shared/data/scifact/corpus.jsonl")
REFERENCE = Path(__file__).resolve().parents[2] / "data" / "embedding" / "fp32_reference.json"


def text_vector(text: str, dim: int = 8) -> np.ndarray:
    """A vector that identifies its text, so a test can tell whose vector a caller got."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return l2_normalise(np.random.default_rng(seed).standard_normal((1, dim)).astype(np.float32))[0]


class ScriptedBackend(EmbeddingBackend):
    """Tokens = words; each batch takes `delay` seconds (or waits for `gate`); every batch is recorded."""

    def __init__(self, *, delay: float = 0.0, max_batch_size: int = 256, max_in_flight: int = 1,
                 dim: int = 8) -> None:
        self.model_id = "scripted"
        self.dimension = dim
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self.max_tokens = 256
        self.delay = delay
        self.gate: asyncio.Event | None = None
        self.batches: list[list[str]] = []
        self.fail_with: Exception | None = None

    def prepare(self, texts: Sequence[str]) -> list[PreparedText]:
        return [PreparedText(t, min(len(t.split()), 256), len(t.split()) > 256) for t in texts]

    async def embed(self, items: Sequence[PreparedText]) -> np.ndarray:
        self.batches.append([i.text for i in items])
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        return np.stack([text_vector(i.text, self.dimension) for i in items])

    @property
    def texts_embedded(self) -> int:
        return sum(len(b) for b in self.batches)


@pytest.fixture(name="text_vector")
def text_vector_fixture():
    return text_vector


@pytest.fixture
def scripted() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture(scope="session")
async def onnx_backend():
    backend = OnnxBackend(OnnxConfig())
    await backend.start()
    yield backend
    await backend.close()


@pytest.fixture(scope="session")
async def float32_backend():
    backend = OnnxBackend(OnnxConfig(compute="float32"))
    await backend.start()
    yield backend
    await backend.close()


@pytest.fixture(params=["int8", "float32"])
def each_compute(request, onnx_backend, float32_backend):
    """The model in each compute, for tests that must hold for both."""
    return onnx_backend if request.param == "int8" else float32_backend


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def scifact_texts() -> list[str]:
    """Titles, single sentences and whole abstracts: the varied lengths real traffic has."""
    texts: list[str] = []
    with SCIFACT.open() as handle:
        for line in handle:
            doc = json.loads(line)
            texts.append(doc["title"])
            texts.extend(re.split(r"(?<=[.!?])\s+", doc["text"])[:2])
            if len(texts) >= 300:
                break
    return [t for t in texts if t.strip()]
