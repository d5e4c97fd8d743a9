"""Retrieval service: per-tenant chunk storage and hybrid (dense + BM25) search with rerank, MMR and a cache."""
