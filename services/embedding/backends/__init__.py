"""Embedding backends behind one interface (base.EmbeddingBackend); `build_backend` picks one from config."""

from __future__ import annotations

from services.embedding.backends.base import EmbeddingBackend, PreparedText
from services.embedding.config import EmbeddingConfig


def build_backend(config: EmbeddingConfig) -> EmbeddingBackend:
    # Imported lazily: the remote backend never loads onnxruntime, the local one never loads openai.
    if config.backend == "openai":
        from services.embedding.backends.remote import RemoteEmbeddingBackend

        return RemoteEmbeddingBackend(config.openai)
    from services.embedding.backends.onnx import OnnxBackend

    return OnnxBackend(config.onnx)


__all__ = ["EmbeddingBackend", "PreparedText", "build_backend"]
