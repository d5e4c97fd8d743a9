"""Start-up validation of the gateway's settings: combinations the request path would refuse or silently change
fail start-up with a message naming the variables, and so does a configured tokenizer that does not load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.gateway.chunker import load_tokenizer
from services.gateway.config import GatewayConfig
from services.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def _env(**values: str) -> dict[str, str]:
    return {f"RAGFLEET_GATEWAY_{name}": value for name, value in values.items()}


@pytest.mark.parametrize("values, needles", [
    ({"CHUNK_TOKENS": "600"}, ["CHUNK_TOKENS=600", "MAX_CHUNK_TOKENS=512"]),
    ({"DEFAULT_TOP_K": "60"}, ["DEFAULT_TOP_K=60", "MAX_TOP_K=50"]),
    ({"DEFAULT_TOP_K": "8", "MAX_TOP_K": "5"}, ["DEFAULT_TOP_K=8", "MAX_TOP_K=5"]),
    ({"CHUNK_TOKENS": "200", "CHUNK_OVERLAP": "60"}, ["CHUNK_OVERLAP=60", "at most 50"]),
])
def test_inconsistent_limits_fail_start_up(values, needles):
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_env(_env(**values))
    for needle in needles:
        assert needle in str(info.value)


def test_consistent_limits_are_accepted_as_set():
    config = GatewayConfig.from_env(_env(CHUNK_TOKENS="600", MAX_CHUNK_TOKENS="600", CHUNK_OVERLAP="150",
                                         DEFAULT_TOP_K="50"))
    assert (config.ingest.chunk_tokens, config.ingest.chunk_overlap, config.ask.default_top_k) == (600, 150, 50)


def test_an_unloadable_configured_tokenizer_is_a_config_error(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not a tokenizer")
    for path in (str(tmp_path / "missing.json"), str(broken)):
        with pytest.raises(ConfigError, match="RAGFLEET_GATEWAY_TOKENIZER_PATH"):
            load_tokenizer(path)
    assert load_tokenizer(None) is not None, "no path set: the default (vendored or word estimate) still applies"


def test_gateway_refuses_to_start_with_an_unloadable_tokenizer(tmp_path):
    # Internal auth off: its token file is read before the service is built, and would be the error reported.
    env = {**os.environ, **_env(TOKENIZER_PATH=str(tmp_path / "missing.json"), PORT="0", METRICS_PORT="0"),
           "RAGFLEET_INTERNAL_AUTH": "off"}
    result = subprocess.run([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "configuration error" in result.stderr and "TOKENIZER_PATH" in result.stderr

