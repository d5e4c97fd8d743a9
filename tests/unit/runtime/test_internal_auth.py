"""Service tokens: config errors name the variable, callers files parse strictly, files reload on change, local
credentials are private and consistent, and channels present the token."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import grpc
import pytest

from services.runtime.channels import ChannelPool
from services.runtime.errors import ConfigError, Unauthenticated
from services.runtime.internal_auth import (CALLERS_FILE_VAR, TOKEN_FILE_VAR, CallersAuthenticator, CallerToken,
                                            InternalAuth, InternalAuthConfig, token_digest, write_local_credentials)
from services.runtime.pb.ragfleet.v1 import embedding_pb2, embedding_pb2_grpc

from services.runtime.config import ServerConfig
from services.runtime.serve import Binding, GrpcServer

from .conftest import EMBEDDING, ScriptedEmbedding


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize("component, environ, variable", [
    ("embedding", {}, CALLERS_FILE_VAR),
    ("generation", {}, CALLERS_FILE_VAR),
    ("retrieval", {CALLERS_FILE_VAR: "/x"}, TOKEN_FILE_VAR),
    ("gateway", {}, TOKEN_FILE_VAR),
])
def test_token_mode_needs_the_files_of_the_service_role(component, environ, variable):
    with pytest.raises(ConfigError) as info:
        InternalAuthConfig.from_env(component, environ)
    assert str(info.value).startswith(f"{variable} is not set") and "RAGFLEET_INTERNAL_AUTH=off" in str(info.value)


def test_off_needs_nothing_and_the_gateway_needs_no_callers_file(tmp_path):
    assert not InternalAuthConfig.from_env("retrieval", {"RAGFLEET_INTERNAL_AUTH": "off"}).enabled
    with pytest.raises(ConfigError, match="must be token or off"):
        InternalAuthConfig.from_env("gateway", {"RAGFLEET_INTERNAL_AUTH": "maybe"})
    token = tmp_path / "t"
    token.write_text("abc\n")
    auth = InternalAuth.load(InternalAuthConfig.from_env("gateway", {TOKEN_FILE_VAR: str(token)}))
    assert auth.authenticator is None and auth.token is not None and auth.token.metadata() == (
        ("authorization", "Bearer abc"),)


@pytest.mark.parametrize("text, message", [
    ("", "lists no callers"),
    ("# only a comment\n", "lists no callers"),
    ("gateway\n", "line 1: expected"),
    (f"gateway {'z' * 64}\n", "line 1: the digest is not hex"),
])
def test_a_bad_callers_file_fails_start_up(tmp_path, text, message):
    path = tmp_path / "callers"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        CallersAuthenticator(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        CallersAuthenticator(str(tmp_path / "missing"))


def test_callers_are_told_apart_and_the_file_reloads(tmp_path, monkeypatch):
    path = tmp_path / "callers"
    path.write_text(f"# rotation overlap\ngateway {token_digest('g1')}\ngateway {token_digest('g2')}  # new\n"
                    f"retrieval {token_digest('r1')}\n")
    auth = CallersAuthenticator(str(path))
    assert auth.authenticate(bearer("g1")) == auth.authenticate(bearer("g2")) == "gateway"
    assert auth.authenticate([("authorization", b"bearer r1")]) == "retrieval"
    for metadata, message in ((None, "without a service token"), (bearer(""), "malformed"),
                              ([("authorization", "Basic r1")], "malformed"), (bearer("x"), "unknown service token")):
        with pytest.raises(Unauthenticated, match=message):
            auth.authenticate(metadata)
    path.write_text(f"gateway {token_digest('g2')}\n")
    assert auth.authenticate(bearer("g1")) == "gateway"  # not re-checked within the second
    monkeypatch.setattr(time, "monotonic", lambda real=time.monotonic: real() + 5)
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer("g1"))
    assert auth.callers == ["gateway"]
    path.write_text("garbage\n")  # a broken rewrite keeps the last good list
    monkeypatch.setattr(time, "monotonic", lambda real=time.monotonic: real() + 10)
    assert auth.authenticate(bearer("g2")) == "gateway"


def test_local_credentials_are_private_and_match(tmp_path):
    env = write_local_credentials(tmp_path / "auth")
    assert stat.S_IMODE(os.stat(tmp_path / "auth").st_mode) == 0o700
    assert set(env) == {"gateway", "embedding", "retrieval", "generation"}
    assert set(env["gateway"]) == {TOKEN_FILE_VAR} and set(env["retrieval"]) == {TOKEN_FILE_VAR, CALLERS_FILE_VAR}
    for files in env.values():
        for path in files.values():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    tokens = {name: Path(env[name][TOKEN_FILE_VAR]).read_text().strip() for name in ("gateway", "retrieval")}
    assert tokens["gateway"] != tokens["retrieval"] and len(tokens["gateway"]) >= 40
    accepts = {name: CallersAuthenticator(env[name][CALLERS_FILE_VAR]) for name in ("embedding", "retrieval",
                                                                                     "generation")}
    assert accepts["embedding"].callers == ["gateway", "retrieval"]
    assert accepts["retrieval"].callers == accepts["generation"].callers == ["gateway"]
    assert accepts["embedding"].authenticate(bearer(tokens["retrieval"])) == "retrieval"
    with pytest.raises(Unauthenticated):
        accepts["generation"].authenticate(bearer(tokens["retrieval"]))
    again = write_local_credentials(tmp_path / "other")
    assert Path(again["gateway"][TOKEN_FILE_VAR]).read_text() != Path(env["gateway"][TOKEN_FILE_VAR]).read_text()


async def test_channels_present_the_token_to_an_authenticating_server(tmp_path):
    env = write_local_credentials(tmp_path)
    callers = CallersAuthenticator(env["embedding"][CALLERS_FILE_VAR])
    srv = GrpcServer(ServerConfig(component="test", host="127.0.0.1", port=0, metrics_port=0), authenticator=callers,
                     bindings=[Binding(EMBEDDING, embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
                                       ScriptedEmbedding())])
    port = await srv.start()
    anonymous, pool = ChannelPool(token=None), ChannelPool(token=CallerToken(env["retrieval"][TOKEN_FILE_VAR]))
    try:
        request = embedding_pb2.EmbedRequest(texts=["hello"])
        reply = await embedding_pb2_grpc.EmbeddingServiceStub(pool.get(f"127.0.0.1:{port}")).Embed(request, timeout=5)
        assert len(reply.embeddings) == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await embedding_pb2_grpc.EmbeddingServiceStub(anonymous.get(f"127.0.0.1:{port}")).Embed(request,
                                                                                                   timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await pool.close()
        await anonymous.close()
        await srv.stop(grace=0)
