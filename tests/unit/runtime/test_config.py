"""Env parsing and ServerConfig.from_env: typed values, defaults, and start-up errors that name the variable."""

from __future__ import annotations

import pytest

from services.runtime.config import DEFAULT_PORTS, Env, ServerConfig, data_dir, redis_url
from services.runtime.errors import ConfigError


def test_env_reads_prefixed_typed_values() -> None:
    env = Env("RAGFLEET_X_", {"RAGFLEET_X_N": " 7 ", "RAGFLEET_X_F": "0.25", "RAGFLEET_X_B": "Yes",
                              "RAGFLEET_X_L": "a, b,,c ", "RAGFLEET_X_S": "hello", "N": "99"})
    assert env.int("N", 1) == 7
    assert env.float("F", 1.0) == 0.25
    assert env.bool("B", False) is True
    assert env.list("L") == ("a", "b", "c")
    assert env.str("S", "d") == "hello"
    assert env.optional_str("MISSING") is None


def test_env_defaults_when_unset_or_empty() -> None:
    env = Env("P_", {"P_EMPTY": "  "})
    assert env.int("EMPTY", 3) == 3
    assert env.float("MISSING", 1.5) == 1.5
    assert env.str("EMPTY", "dflt") == "dflt"
    assert env.bool("MISSING", True) is True
    assert env.list("MISSING", ("x",)) == ("x",)
    assert env.optional_str("EMPTY") is None


@pytest.mark.parametrize(("method", "raw", "needle"), [
    ("int", "12a", "RAGFLEET_T_V='12a' is not an integer"),
    ("float", "fast", "RAGFLEET_T_V='fast' is not a number"),
    ("bool", "maybe", "RAGFLEET_T_V='maybe' is not a boolean"),
])
def test_env_malformed_values_name_the_variable(method: str, raw: str, needle: str) -> None:
    env = Env("RAGFLEET_T_", {"RAGFLEET_T_V": raw})
    with pytest.raises(ConfigError) as info:
        getattr(env, method)("V", *((0,) if method != "bool" else (False,)))
    assert needle in str(info.value)


def test_env_minimum_is_enforced_with_the_limit_in_the_message() -> None:
    env = Env("RAGFLEET_T_", {"RAGFLEET_T_PORT": "-1", "RAGFLEET_T_GRACE": "-0.5"})
    with pytest.raises(ConfigError, match=r"RAGFLEET_T_PORT=-1 must be >= 0"):
        env.int("PORT", 1, minimum=0)
    with pytest.raises(ConfigError, match=r"RAGFLEET_T_GRACE=-0.5 must be >= 0"):
        env.float("GRACE", 1.0, minimum=0)


def test_server_config_defaults_use_the_fixed_port_map() -> None:
    config = ServerConfig.from_env("retrieval", {})
    assert config.port == DEFAULT_PORTS["retrieval"] == 50052
    assert config.host == "0.0.0.0" and config.address == "0.0.0.0:50052"
    assert config.grace_seconds == 10.0
    assert config.log_format == "json" and config.log_level == "INFO"
    assert config.event_loop == "uvloop"


def test_server_config_reads_its_own_prefix_and_the_shared_log_settings() -> None:
    environ = {
        "RAGFLEET_GATEWAY_HOST": "127.0.0.1", "RAGFLEET_GATEWAY_PORT": "0", "RAGFLEET_GATEWAY_METRICS_PORT": "9999",
        "RAGFLEET_GATEWAY_GRACE_SECONDS": "2.5", "RAGFLEET_GATEWAY_MAX_CONNECTION_AGE_SECONDS": "60",
        "RAGFLEET_GATEWAY_MAX_CONNECTION_AGE_GRACE_SECONDS": "5", "RAGFLEET_GATEWAY_KEEPALIVE_SECONDS": "20",
        "RAGFLEET_GATEWAY_MAX_MESSAGE_MB": "8", "RAGFLEET_LOG_LEVEL": "debug", "RAGFLEET_LOG_FORMAT": "text",
        "RAGFLEET_EVENT_LOOP": "asyncio",
        "RAGFLEET_EMBEDDING_PORT": "1234",  # another service's variable must not leak in
    }
    config = ServerConfig.from_env("gateway", environ)
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 0, 9999)
    assert (config.grace_seconds, config.max_connection_age_seconds, config.max_connection_age_grace_seconds,
            config.keepalive_seconds, config.max_message_mb) == (2.5, 60.0, 5.0, 20.0, 8)
    assert (config.log_level, config.log_format, config.event_loop) == ("DEBUG", "text", "asyncio")


@pytest.mark.parametrize(("environ", "needle"), [
    ({"RAGFLEET_LOG_FORMAT": "xml"}, "RAGFLEET_LOG_FORMAT='xml' must be json or text"),
    ({"RAGFLEET_EVENT_LOOP": "trio"}, "RAGFLEET_EVENT_LOOP='trio' must be uvloop or asyncio"),
    ({"RAGFLEET_EMBEDDING_PORT": "http"}, "RAGFLEET_EMBEDDING_PORT='http' is not an integer"),
    ({"RAGFLEET_EMBEDDING_MAX_CONNECTION_AGE_SECONDS": "0"}, "must be >= 1"),
    ({"RAGFLEET_EMBEDDING_MAX_MESSAGE_MB": "0"}, "RAGFLEET_EMBEDDING_MAX_MESSAGE_MB=0 must be >= 1"),
])
def test_server_config_rejects_bad_values(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env("embedding", environ)
    assert needle in str(info.value)


def test_server_config_is_frozen() -> None:
    config = ServerConfig.from_env("generation", {})
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_shared_redis_and_data_dir_settings() -> None:
    assert redis_url({}) is None
    assert redis_url({"RAGFLEET_REDIS_URL": ""}) is None
    assert redis_url({"RAGFLEET_REDIS_URL": "redis://r:6379/2"}) == "redis://r:6379/2"
    assert data_dir({}) == ".ragfleet"
    assert data_dir({"RAGFLEET_DATA_DIR": "/var/lib/ragfleet"}) == "/var/lib/ragfleet"
