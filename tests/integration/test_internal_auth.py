"""Issue 10, defect 1: the internal services accept calls only from the services that need them, with a service
token; tokens rotate by rewriting the files, without a restart (real processes, the mesh `ragfleet up` runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.cli.mesh import LocalMesh
from services.runtime.internal_auth import CALLERS_FILE_VAR, TOKEN_FILE_VAR, token_digest
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, generation_pb2,
                                             generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc)

from .conftest import MeshInfo

TENANT = "tenantA"
VECTOR = [0.1] * 384


def retrieval_calls(channel: grpc.Channel, metadata) -> dict[str, Callable[[], object]]:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
    return {
        "Search": lambda: stub.Search(retrieval_pb2.SearchRequest(tenant=TENANT, query_text="launch code", top_k=5,
                                                                  mode=common_pb2.SEARCH_MODE_SPARSE),
                                      timeout=10, metadata=metadata),
        "Upsert": lambda: stub.Upsert(retrieval_pb2.UpsertRequest(tenant=TENANT, chunks=[retrieval_pb2.Chunk(
            doc_id="secret", text="the launch code is 0000", vector=VECTOR)]), timeout=10, metadata=metadata),
        "Delete": lambda: stub.Delete(retrieval_pb2.DeleteRequest(tenant=TENANT, doc_ids=["secret"]), timeout=10,
                                      metadata=metadata),
    }


def generate(channel: grpc.Channel, metadata) -> list[generation_pb2.GenerateResponse]:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    passage = common_pb2.Passage(number=1, text="The launch code is kept in the vault.")
    return list(stub.Generate(generation_pb2.GenerateRequest(question="Where is the launch code?",
                                                             passages=[passage]), timeout=10, metadata=metadata))


def embed(channel: grpc.Channel, metadata) -> embedding_pb2.EmbedResponse:
    return embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(embedding_pb2.EmbedRequest(texts=["hello"]),
                                                                   timeout=30, metadata=metadata)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    return info.value


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_the_issue_repro_is_refused_without_a_token(offline_mesh: MeshInfo) -> None:
    with grpc.insecure_channel(offline_mesh.address("retrieval")) as channel:
        for name, call in retrieval_calls(channel, None).items():
            error = refused(call)
            assert "internal call without a service token" in error.details(), name
        refused(retrieval_calls(channel, (("authorization", "Basic abc"),))["Search"])
    with grpc.insecure_channel(offline_mesh.address("generation")) as channel:
        assert "without a service token" in refused(lambda: generate(channel, None)).details()
    with grpc.insecure_channel(offline_mesh.address("embedding")) as channel:
        refused(lambda: embed(channel, None))


def test_only_the_callers_each_service_needs_are_accepted(offline_mesh: MeshInfo) -> None:
    mesh = offline_mesh.mesh
    gateway, retrieval = mesh.internal_metadata("gateway"), mesh.internal_metadata("retrieval")
    with grpc.insecure_channel(offline_mesh.address("generation")) as channel:
        error = refused(lambda: generate(channel, retrieval))  # retrieval has no business calling generation
        assert "unknown service token" in error.details() and "gateway" in error.details()
        assert generate(channel, gateway)[-1].HasField("finished")
    with grpc.insecure_channel(offline_mesh.address("retrieval")) as channel:
        refused(retrieval_calls(channel, retrieval)["Search"])
        refused(retrieval_calls(channel, bearer("a-guessed-token"))["Upsert"])
        calls = retrieval_calls(channel, gateway)
        assert calls["Upsert"]().upserted == 1
        assert [h.doc_id for h in calls["Search"]().hits] == ["secret"]
        assert calls["Delete"]().deleted_chunks == 1
    with grpc.insecure_channel(offline_mesh.address("embedding")) as channel:
        assert len(embed(channel, gateway).embeddings) == 1
        assert len(embed(channel, retrieval).embeddings) == 1


def test_health_and_reflection_stay_open(offline_mesh: MeshInfo) -> None:
    for name in ("embedding", "retrieval", "generation"):
        with grpc.insecure_channel(offline_mesh.address(name)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            listing = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert any(s.name.startswith("ragfleet.v1.") for s in listing.list_services_response.service)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def _accepted(call: Callable[[], object]) -> bool:
    try:
        call()
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.details()
        return False


def _write(path: str, text: str) -> None:
    tmp = f"{path}.new"
    Path(tmp).write_text(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def test_tokens_rotate_without_a_restart(tmp_path: Path) -> None:
    with LocalMesh(data_dir=tmp_path, env={"RAGFLEET_LOG_LEVEL": "WARNING"}) as mesh:
        mesh.start(["embedding", "retrieval"])
        pids = {name: p.process.pid for name, p in mesh.processes.items()}
        creds = mesh.credentials
        assert creds is not None
        retrieval_callers = creds["retrieval"][CALLERS_FILE_VAR]
        embedding_callers = creds["embedding"][CALLERS_FILE_VAR]
        old_gateway = mesh.internal_metadata("gateway")
        with grpc.insecure_channel(mesh.address("retrieval")) as channel:
            search = lambda md: retrieval_calls(channel, md)["Search"]  # noqa: E731
            dense = lambda md: lambda: retrieval_pb2_grpc.RetrievalServiceStub(channel).Search(  # noqa: E731
                retrieval_pb2.SearchRequest(tenant=TENANT, query_text="bees", top_k=1,
                                            mode=common_pb2.SEARCH_MODE_DENSE), timeout=10, metadata=md)
            assert _accepted(search(old_gateway))
            # 1. Overlap: both the old and the new gateway token are listed.
            new_token = "rotated-gateway-token-" + os.urandom(8).hex()
            old_lines = Path(retrieval_callers).read_text()
            _write(retrieval_callers, old_lines + f"gateway {token_digest(new_token)}\n")
            assert _eventually(lambda: _accepted(search(bearer(new_token))))
            assert _accepted(search(old_gateway))
            # 2. The old token is withdrawn: refused from then on, the new one still works.
            _write(retrieval_callers, f"# rotated\ngateway {token_digest(new_token)}\n")
            assert _eventually(lambda: not _accepted(search(old_gateway)))
            assert _accepted(search(bearer(new_token)))
            # 3. Retrieval's own token (what it presents to embedding) rotates the same way: the dense leg embeds
            #    the query at embedding, so it works only while embedding accepts the token retrieval now sends.
            assert _accepted(dense(bearer(new_token)))
            retrieval_token = "rotated-retrieval-token-" + os.urandom(8).hex()
            _write(embedding_callers, Path(embedding_callers).read_text()
                   + f"retrieval {token_digest(retrieval_token)}\n")
            time.sleep(1.5)  # embedding picks the new digest up before retrieval switches
            _write(creds["retrieval"][TOKEN_FILE_VAR], retrieval_token + "\n")
            gateway_digest = next(line for line in Path(embedding_callers).read_text().splitlines()
                                  if line.startswith("gateway "))
            _write(embedding_callers, f"{gateway_digest}\nretrieval {token_digest(retrieval_token)}\n")
            time.sleep(1.5)
            assert _accepted(dense(bearer(new_token)))
            with grpc.insecure_channel(mesh.address("embedding")) as emb:
                assert _accepted(lambda: embed(emb, bearer(retrieval_token)))
        assert {name: p.process.pid for name, p in mesh.processes.items()} == pids  # no restart
        assert all(p.process.poll() is None for p in mesh.processes.values())


def _start_up(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAGFLEET_INTERNAL_")}
    full.update({"RAGFLEET_GENERATION_HOST": "127.0.0.1", "RAGFLEET_GENERATION_PORT": "0",
                 "RAGFLEET_GENERATION_METRICS_PORT": "0", "RAGFLEET_DATA_DIR": str(tmp_path), **env})
    return subprocess.run([sys.executable, "-m", "services.generation"], env=full, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("case", ["unset", "empty", "missing"])
def test_a_missing_callers_file_fails_start_up_in_one_line(tmp_path: Path, case: str) -> None:
    empty = tmp_path / "empty.callers"
    empty.write_text("# nobody\n")
    env = {"unset": {}, "empty": {CALLERS_FILE_VAR: str(empty)},
           "missing": {CALLERS_FILE_VAR: str(tmp_path / "nope")}}[case]
    result = _start_up(env, tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("generation: configuration error: RAGFLEET_INTERNAL_CALLERS_FILE")
    assert "RAGFLEET_INTERNAL_AUTH=off" in line and "Traceback" not in result.stderr


def test_auth_off_is_a_documented_switch(tmp_path: Path) -> None:
    with LocalMesh(data_dir=tmp_path, env={"RAGFLEET_INTERNAL_AUTH": "off", "RAGFLEET_LOG_LEVEL": "WARNING"}) as mesh:
        mesh.start(["generation"])
        with grpc.insecure_channel(mesh.address("generation")) as channel:
            assert generate(channel, None)[-1].HasField("finished")
