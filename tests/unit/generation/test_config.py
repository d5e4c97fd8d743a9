"""GenerationConfig.from_env: LLM selection, typed settings, per-model JSON and start-up errors."""

from __future__ import annotations

import pytest

from services.generation.config import GenerationConfig
from services.runtime.errors import ConfigError


def test_defaults_are_offline():
    config = GenerationConfig.from_env({})
    assert config.llm is None and config.default_model == "extractive" and not config.fallback
    assert config.server.port == 50053 and config.coalesce.max_delay == pytest.approx(0.005)


def test_llm_and_model_settings():
    config = GenerationConfig.from_env({
        "RAGFLEET_LLM_BASE_URL": "http://127.0.0.1:9/v1", "RAGFLEET_LLM_MODEL": "big",
        "RAGFLEET_GENERATION_FALLBACK": "true", "RAGFLEET_GENERATION_MAX_RETRIES": "1",
        "RAGFLEET_GENERATION_FIRST_TOKEN_TIMEOUT_SECONDS": "0.5", "RAGFLEET_GENERATION_STOP": "END, STOP",
        "RAGFLEET_GENERATION_MODEL_SETTINGS": '{"small": {"max_tokens": 64, "stop": ["x"], "context_tokens": 4096}}',
    })
    assert config.llm.base_url == "http://127.0.0.1:9/v1" and config.default_model == "big"
    assert config.fallback and config.llm.max_retries == 1 and config.llm.timeouts.first_token == 0.5
    assert config.defaults.stop == ("END", "STOP")
    small = config.settings_for("small")
    assert (small.max_tokens, small.stop, small.context_tokens, small.temperature) == (64, ("x",), 4096, 0.2)
    assert config.settings_for("other") == config.defaults


def test_the_llm_connection_pool_follows_the_admission_limit():
    # Each open stream holds one HTTP connection: a smaller pool would queue admitted streams out of sight.
    url = {"RAGFLEET_LLM_BASE_URL": "http://127.0.0.1:9/v1"}
    assert GenerationConfig.from_env(url).llm.max_connections == GenerationConfig.from_env(url).limits.max_concurrent
    assert GenerationConfig.from_env({**url, "RAGFLEET_GENERATION_MAX_CONCURRENT": "300"}).llm.max_connections == 300
    explicit = GenerationConfig.from_env({**url, "RAGFLEET_GENERATION_MAX_CONCURRENT": "300",
                                          "RAGFLEET_GENERATION_MAX_CONNECTIONS": "40"})
    assert (explicit.llm.max_connections, explicit.limits.max_concurrent) == (40, 300)


@pytest.mark.parametrize("environ, message", [
    ({"RAGFLEET_GENERATION_MODEL_SETTINGS": '{"m": {"stop": "END"}}'}, r"\.stop must be a list of non-empty strings"),
    ({"RAGFLEET_GENERATION_MODEL_SETTINGS": '{"m": {"stop": ["a", "b", "c", "d", "e"]}}'}, "5 stop sequences; the limit is 4"),
    ({"RAGFLEET_GENERATION_STOP": "a,b,c,d,e,f"}, "RAGFLEET_GENERATION_STOP has 6 stop sequences; the limit is 4"),
])
def test_default_stop_sequences_are_checked_at_start_up(environ, message):
    # Requests are held to 4 stop sequences; a default over it would make the LLM refuse every request.
    with pytest.raises(ConfigError, match=message):
        GenerationConfig.from_env(environ)


@pytest.mark.parametrize("value, message", [
    ("not json", "not valid JSON"), ('["a"]', "must be a JSON object"),
    ('{"m": {"max_tokenz": 1}}', "unknown setting 'max_tokenz'"), ('{"m": {"max_tokens": "x"}}', "wrong type"),
])
def test_bad_model_settings_fail_start_up(value, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig.from_env({"RAGFLEET_GENERATION_MODEL_SETTINGS": value})


def test_bad_number_names_the_variable():
    with pytest.raises(ConfigError, match="RAGFLEET_GENERATION_MAX_RETRIES"):
        GenerationConfig.from_env({"RAGFLEET_GENERATION_MAX_RETRIES": "-1"})
