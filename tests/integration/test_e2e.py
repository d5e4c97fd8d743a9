"""End to end on embedded defaults (issue 2): four real service processes, the offline extractive answerer,
documents ingested with `ragfleet ingest`, answers with [n] citations from `ragfleet ask` and over gRPC."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import grpc
import pytest

from services.cli.ask import ask as cli_ask
from services.cli.ingest import ingest_path
from services.runtime.pb.ragfleet.v1 import gateway_pb2, gateway_pb2_grpc
from tests.integration.conftest import MeshInfo

FILES = {
    "photosynthesis.md": "# Photosynthesis\n\nPhotosynthesis is the process by which green plants use sunlight, "
                         "water and carbon dioxide to make glucose. Oxygen is released as a by-product.\n",
    "notes/tides.txt": "Tides are the rise and fall of sea levels caused by the gravitational pull of the Moon and "
                       "the Sun. Most coasts see two high tides a day.\n",
}
BEIR = [
    {"_id": "beir-1", "title": "Honey bees", "text": "Honey bees communicate the location of flowers with a "
                                                      "waggle dance performed inside the hive."},
    {"_id": "beir-2", "title": "Basalt", "text": "Basalt is a dark volcanic rock formed from rapidly cooled lava."},
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "beir").mkdir()
    (root / "beir" / "corpus.jsonl").write_text("\n".join(json.dumps(row) for row in BEIR) + "\n")
    return root


@pytest.fixture(scope="module")
def ingested(offline_mesh: MeshInfo, corpus_dir) -> MeshInfo:
    documents, chunks = ingest_path(offline_mesh.gateway, str(corpus_dir), show_progress=False)
    assert documents == 4 and chunks >= 4
    # idempotent: the same files again write the same chunks, no duplicates
    assert ingest_path(offline_mesh.gateway, str(corpus_dir), show_progress=False) == (documents, chunks)
    return offline_mesh


async def test_ask_returns_sources_answer_and_citations(ingested: MeshInfo):
    async with grpc.aio.insecure_channel(ingested.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        events = [e async for e in stub.Ask(gateway_pb2.AskRequest(question="How do plants make glucose?", top_k=3),
                                            timeout=30)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "sources" and kinds[-1] == "finished" and "delta" in kinds
    sources = events[0].sources.passages
    assert sources[0].doc_id == "photosynthesis.md" and sources[0].title == "Photosynthesis"
    answer = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    assert "sunlight" in answer or "glucose" in answer
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer)}
    assert cited and cited <= {p.number for p in sources}, answer
    finished = events[-1].finished
    assert finished.timings.total_ms > 0 and finished.cache_status == gateway_pb2.CACHE_STATUS_MISS


def test_cli_functions_stream_answer_then_sources(ingested: MeshInfo):
    out = io.StringIO()
    assert cli_ask(ingested.gateway, "What causes tides?", out=out) == 0
    text = out.getvalue()
    answer, _, sources = text.partition("Sources:")
    assert re.search(r"\[\d+\]", answer) and "Moon" in answer
    assert "notes/tides.txt" in sources and "[1]" in sources


def test_cli_commands_as_a_user_runs_them(ingested: MeshInfo, corpus_dir):
    env_args = ["--gateway", ingested.gateway]
    ingest = subprocess.run([sys.executable, "-m", "services.cli", "ingest", str(corpus_dir / "beir" / "corpus.jsonl"),
                             "--no-progress", *env_args], capture_output=True, text=True, timeout=60)
    assert ingest.returncode == 0, ingest.stderr
    assert "ingested 2 documents" in ingest.stdout
    ask = subprocess.run([sys.executable, "-m", "services.cli", "ask", "How do honey bees communicate?", *env_args],
                         capture_output=True, text=True, timeout=60)
    assert ask.returncode == 0, ask.stderr
    assert "waggle dance" in ask.stdout and "beir-1" in ask.stdout.split("Sources:")[1]
    bad = subprocess.run([sys.executable, "-m", "services.cli", "ask", "   ", *env_args],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "question" in bad.stderr
