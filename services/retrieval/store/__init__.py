"""Vector stores behind one interface: the embedded qdrant-edge engine and a remote Qdrant server."""

from __future__ import annotations

from services.retrieval.config import RetrievalConfig
from services.retrieval.store.base import StoreStartupError, VectorStore


def open_store(config: RetrievalConfig) -> VectorStore:
    """Pick the implementation from config; nothing else in the service knows which one runs."""
    if config.store == "remote":
        from services.retrieval.store.remote import RemoteStore

        return RemoteStore(url=config.qdrant_url, grpc_port=config.qdrant_grpc_port, api_key=config.qdrant_api_key,
                           collection=config.collection, index=config.index)
    from services.retrieval.store.edge import EdgeStore

    return EdgeStore(path=config.data_dir, index=config.index)


__all__ = ["StoreStartupError", "VectorStore", "open_store"]
