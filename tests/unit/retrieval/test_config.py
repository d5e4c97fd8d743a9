"""RetrievalConfig.from_env: defaults, overrides, and start-up errors naming the variable."""

from __future__ import annotations

import os

import pytest

from services.retrieval.config import IndexConfig, RetrievalConfig
from services.retrieval.store import open_store
from services.retrieval.store.remote import RemoteStore
from services.runtime.errors import ConfigError


def test_defaults():
    config = RetrievalConfig.from_env({})
    assert config.store == "edge" and config.index.dimension == 384 and config.search.max_top_k == 100
    assert config.search.rrf_k == 60 and config.rerank.kind == "fusion" and config.embedding_address is None
    assert config.data_dir.endswith("retrieval") and config.cache.redis_url is None


def test_overrides():
    config = RetrievalConfig.from_env({
        "RAGFLEET_RETRIEVAL_STORE": "remote", "RAGFLEET_RETRIEVAL_QDRANT_URL": "http://qdrant:6333",
        "RAGFLEET_RETRIEVAL_DIMENSION": "768", "RAGFLEET_RETRIEVAL_MAX_TOP_K": "50", "RAGFLEET_RETRIEVAL_RRF_K": "20",
        "RAGFLEET_RETRIEVAL_RERANK": "tei", "RAGFLEET_RETRIEVAL_RERANK_URL": "http://tei:8080",
        "RAGFLEET_RETRIEVAL_QUANTIZATION": "int8", "RAGFLEET_RETRIEVAL_FILTER_FIELDS": "lang, year",
        "RAGFLEET_DATA_DIR": "/data", "RAGFLEET_REDIS_URL": "redis://r:6379/0",
        "RAGFLEET_RETRIEVAL_EMBEDDING_ADDRESS": "embedding:50051"})
    assert (config.store, config.index.dimension, config.search.max_top_k, config.search.rrf_k) == \
        ("remote", 768, 50, 20)
    assert config.rerank.kind == "tei" and config.index.quantization == "int8"
    assert config.search.filter_fields == ("lang", "year") and config.data_dir == "/data/retrieval"
    assert config.cache.redis_url == "redis://r:6379/0" and config.embedding_address == "embedding:50051"


@pytest.mark.parametrize("env, message", [
    ({"RAGFLEET_RETRIEVAL_STORE": "faiss"}, "RAGFLEET_RETRIEVAL_STORE='faiss' must be one of edge, remote"),
    ({"RAGFLEET_RETRIEVAL_RERANK": "tei"}, "needs RAGFLEET_RETRIEVAL_RERANK_URL"),
    ({"RAGFLEET_RETRIEVAL_RERANK": "onnx"}, "needs RAGFLEET_RETRIEVAL_RERANK_MODEL_DIR"),
    ({"RAGFLEET_RETRIEVAL_DIMENSION": "0"}, "RAGFLEET_RETRIEVAL_DIMENSION=0 must be >= 1"),
    ({"RAGFLEET_RETRIEVAL_RERANK_ALPHA": "1.5"}, "must be in [0, 1]"),
    ({"RAGFLEET_RETRIEVAL_DEFAULT_MODE": "fuzzy"}, "must be one of dense, sparse, hybrid"),
])
def test_bad_values_fail_start_up(env, message):
    with pytest.raises(ConfigError) as err:
        RetrievalConfig.from_env(env)
    assert message in str(err.value)


@pytest.mark.parametrize("url", ["qdrant.prod.svc:6333", "qdrant:6333", "data/qdrant", "grpc://qdrant:6334"])
def test_a_qdrant_url_without_http_is_a_start_up_error(url, tmp_path, monkeypatch):
    """qdrant-client reads anything but a URL as a local directory: each replica would get its own empty DB."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        RetrievalConfig.from_env({"RAGFLEET_RETRIEVAL_STORE": "remote", "RAGFLEET_RETRIEVAL_QDRANT_URL": url})
    assert f"RAGFLEET_RETRIEVAL_QDRANT_URL={url!r} must start with http:// or https://" in str(err.value)
    with pytest.raises(ConfigError, match="RAGFLEET_RETRIEVAL_QDRANT_URL"):
        RemoteStore(url=url, collection="c", index=IndexConfig(dimension=8))
    assert os.listdir(tmp_path) == []  # no local database was created


@pytest.mark.parametrize("url", ["http://qdrant:6333", "https://qdrant.example.com", ":memory:"])
def test_server_urls_and_the_in_process_mode_are_accepted(url):
    config = RetrievalConfig.from_env({"RAGFLEET_RETRIEVAL_STORE": "remote", "RAGFLEET_RETRIEVAL_QDRANT_URL": url})
    assert config.qdrant_url == url


async def test_memory_url_runs_qdrant_client_in_process():
    store = open_store(RetrievalConfig.from_env({"RAGFLEET_RETRIEVAL_STORE": "remote",
                                                 "RAGFLEET_RETRIEVAL_QDRANT_URL": ":memory:",
                                                 "RAGFLEET_RETRIEVAL_DIMENSION": "8"}))
    assert isinstance(store, RemoteStore) and store._local
    await store.start()
    assert (await store.status()).state == "empty"
    await store.close()
