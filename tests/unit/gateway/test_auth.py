"""API-key auth: bearer parsing, tenants, constant-time lookup, disabled mode, key file parsing (an empty keys file
fails start-up instead of turning auth off)."""

import pytest

from services.gateway.auth import DEFAULT_TENANT, ApiKeyAuth
from services.gateway.config import GatewayConfig, parse_api_keys
from services.runtime.errors import ConfigError, Unauthenticated


def test_key_maps_to_its_tenant():
    auth = ApiKeyAuth({"k-a": "acme", "k-b": "globex"})
    assert auth.authenticate([("authorization", "Bearer k-a")]) == "acme"
    assert auth.authenticate([("Authorization", "bearer   k-b ")]) == "globex"
    assert auth.authenticate([("authorization", b"Bearer k-b")]) == "globex"


@pytest.mark.parametrize("metadata", [None, [], [("x-other", "1")], [("authorization", "k-a")],
                                      [("authorization", "Bearer ")], [("authorization", "Bearer k-c")],
                                      [("authorization", "Bearer k-a-longer")], [("authorization", "Basic k-a")]])
def test_missing_malformed_or_unknown_key_is_unauthenticated(metadata):
    auth = ApiKeyAuth({"k-a": "acme"})
    with pytest.raises(Unauthenticated) as info:
        auth.authenticate(metadata)
    assert "authorization" in info.value.message
    assert "k-a" not in info.value.message or "Bearer" in info.value.message


def test_no_keys_disables_auth_with_default_tenant(caplog):
    with caplog.at_level("WARNING"):
        auth = ApiKeyAuth({})
    assert not auth.enabled
    assert "DISABLED" in caplog.text
    assert auth.authenticate(None) == DEFAULT_TENANT
    assert auth.authenticate([("authorization", "Bearer anything")]) == DEFAULT_TENANT


def test_parse_api_keys_commas_newlines_comments():
    assert parse_api_keys("k1=a, k2=b\n# comment\n\nk3 = c", source="x") == {"k1": "a", "k2": "b", "k3": "c"}
    assert parse_api_keys("  # rotated keys, do not reuse\nk1=a", source="x") == {"k1": "a"}, "a comma in a comment"
    with pytest.raises(ConfigError):
        parse_api_keys("justakey", source="x")
    with pytest.raises(ConfigError):
        parse_api_keys("k1=", source="x")


def test_config_merges_env_keys_and_secrets_file(tmp_path):
    secrets = tmp_path / "keys"
    secrets.write_text("# mounted secret\nfile-key=tenant-f\n")
    config = GatewayConfig.from_env({"RAGFLEET_GATEWAY_API_KEYS": "env-key=tenant-e",
                                     "RAGFLEET_GATEWAY_API_KEYS_FILE": str(secrets)})
    assert dict(config.api_keys) == {"env-key": "tenant-e", "file-key": "tenant-f"}
    with pytest.raises(ConfigError, match="API_KEYS_FILE"):
        GatewayConfig.from_env({"RAGFLEET_GATEWAY_API_KEYS_FILE": str(tmp_path / "missing")})


def test_config_defaults_and_validation():
    config = GatewayConfig.from_env({})
    assert config.server.port == 50050
    assert not config.api_keys and config.redis_url is None
    assert config.ask.max_in_flight == 512
    with pytest.raises(ConfigError, match="CHUNK_OVERLAP"):
        GatewayConfig.from_env({"RAGFLEET_GATEWAY_CHUNK_TOKENS": "32", "RAGFLEET_GATEWAY_CHUNK_OVERLAP": "32"})


@pytest.mark.parametrize("content", ["", "\n  \n", "# mounted secret, every key removed\n  # another comment\n"])
@pytest.mark.parametrize("env_keys", [None, "env-key=tenant-e"])
def test_a_keys_file_without_keys_fails_start_up_instead_of_disabling_auth(tmp_path, content, env_keys):
    secrets = tmp_path / "keys"
    secrets.write_text(content)
    environ = {"RAGFLEET_GATEWAY_API_KEYS_FILE": str(secrets)}
    if env_keys is not None:
        environ["RAGFLEET_GATEWAY_API_KEYS"] = env_keys
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_env(environ)
    message = str(info.value)
    assert str(secrets) in message and "holds no keys" in message and "unset the variable" in message, message


def test_no_keys_configured_anywhere_still_runs_open_for_local_development(caplog):
    config = GatewayConfig.from_env({})
    with caplog.at_level("WARNING"):
        auth = ApiKeyAuth(config.api_keys)
    assert not auth.enabled and "DISABLED" in caplog.text
    assert auth.authenticate(None) == DEFAULT_TENANT
