"""Issue 10, defect 4: the gateway applies generation's limit on max_tokens, read from the same variable, so one
setting governs both and an Ask generation would refuse is refused before its first event."""

from __future__ import annotations

import pytest

from services.gateway.config import GatewayConfig
from services.runtime.errors import ConfigError


def test_max_tokens_limit_is_generations_variable() -> None:
    assert GatewayConfig.from_env({}).ask.max_tokens == 4096
    assert GatewayConfig.from_env({"RAGFLEET_GENERATION_MAX_TOKENS_LIMIT": "8192"}).ask.max_tokens == 8192


def test_ingest_limits_are_config() -> None:
    config = GatewayConfig.from_env({"RAGFLEET_GATEWAY_MAX_CHUNKS_PER_DOCUMENT": "100",
                                     "RAGFLEET_GATEWAY_MAX_DOCUMENT_CHARS": "5000"}).ingest
    assert (config.max_chunks_per_document, config.max_document_chars) == (100, 5000)
    with pytest.raises(ConfigError, match="RAGFLEET_GATEWAY_MAX_DOCUMENTS=20000"):
        GatewayConfig.from_env({"RAGFLEET_GATEWAY_MAX_DOCUMENTS": "20000"})
