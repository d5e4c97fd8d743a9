"""The fuzz harness shared by tests/fuzz and bench/fuzz.py: a real mesh, the RPC targets, one raw call, the checks.

Every call goes over real gRPC as raw bytes (no client-side serializer), so generated messages and corrupted
wire bytes take exactly the same path into the server. The properties checked for a client mistake:
- the status is never UNKNOWN or INTERNAL (nor DATA_LOSS), and no service counts an UNKNOWN/INTERNAL RPC in
  `ragfleet_rpc_requests_total` (the gateway maps a downstream INTERNAL to UNAVAILABLE, which would hide it);
- every call ends with a status before its deadline (DEADLINE_EXCEEDED counts as not answering);
- every service still answers SERVING on grpc.health.v1 afterwards.

    with FuzzMesh.start(tmp_dir) as fm:
        outcome = fm.call(fm.targets["GatewayService/Ask"], payload)
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from services.cli.mesh import LocalMesh
from services.cli.sim_llm import SimLLMProcess
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, gateway_pb2, generation_pb2,
                                              retrieval_pb2)
from tests._redis import delete_keys
from tests.fuzz.strategies import DEFAULT_HUGE_CHARS, messages, texts

REDIS_URL = os.environ.get("RAGFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DIMENSION = 384
# Statuses a client mistake must never produce.
FORBIDDEN = frozenset({"UNKNOWN", "INTERNAL", "DATA_LOSS"})
_SERVICES = ("embedding", "retrieval", "generation", "gateway")
_LABELS = re.compile(r'ragfleet_rpc_requests_total\{([^}]*)\} ([0-9.e+]+)')


@dataclass(frozen=True)
class Target:
    """One public RPC: how to call it, what a request looks like, how to steer the generator."""

    service: str          # mesh process name
    path: str             # "/ragfleet.v1.GatewayService/Ask"
    request_cls: Any
    streaming: bool
    seeds: tuple[Any, ...]
    hints: Mapping[str, st.SearchStrategy[Any]]
    timeout: float

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]  # "GatewayService/Ask"

    @property
    def string_fields(self) -> tuple[int, ...]:
        return tuple(f.number for f in self.request_cls.DESCRIPTOR.fields if f.type == f.TYPE_STRING)

    def requests(self, huge_chars: int = DEFAULT_HUGE_CHARS) -> st.SearchStrategy[Any]:
        generated = messages(self.request_cls.DESCRIPTOR, hints=self.hints, huge_chars=huge_chars)
        return st.one_of(generated, generated, generated, st.sampled_from(self.seeds))

    def decodes(self, payload: bytes) -> bool:
        try:
            self.request_cls.FromString(payload)
            return True
        except Exception:  # DecodeError, RecursionError, ... : the server's parse would fail the same way
            return False


@dataclass
class Outcome:
    code: str
    elapsed: float
    details: str
    events: int

    def violations(self, target: Target) -> list[str]:
        problems = []
        if self.code in FORBIDDEN:
            problems.append(f"{self.code}: {self.details[:300]}")
        if self.code == "DEADLINE_EXCEEDED" or self.elapsed > target.timeout + 2.0:
            problems.append(f"no status within the {target.timeout:.0f}s deadline ({self.elapsed:.1f}s, {self.code})")
        return problems


def _vector(values: st.SearchStrategy[float] | None = None) -> st.SearchStrategy[list[float]]:
    good = st.lists(st.floats(-1, 1, width=32), min_size=DIMENSION, max_size=DIMENSION).filter(any)
    odd = st.lists(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 3e38, -3.4028234663852886e38, 1e-45]),
                   min_size=DIMENSION, max_size=DIMENSION)
    wrong = st.lists(st.floats(width=32), max_size=DIMENSION + 2)
    return st.one_of(good, good, odd, wrong)


def build_targets(tenants: Sequence[str], doc_ids: Sequence[str], timeout: float = 20.0) -> dict[str, Target]:
    """Every public RPC of every service, with seeds (valid requests) and steering hints."""
    tenant = st.one_of(st.sampled_from(list(tenants)), texts(256))
    doc_id = st.one_of(st.sampled_from(list(doc_ids)), texts(1024))
    question = st.one_of(st.sampled_from(["Why do bees swarm?", "How is honey made?", "What is wax for?"]),
                         texts())
    filter_field = st.one_of(st.sampled_from(["doc_id", "title", "chunk_index", "lang", "tenant"]), texts(64))
    hints: dict[str, st.SearchStrategy[Any]] = {
        "ragfleet.v1.UpsertRequest.tenant": tenant,
        "ragfleet.v1.DeleteRequest.tenant": tenant,
        "ragfleet.v1.SearchRequest.tenant": tenant,
        "ragfleet.v1.Chunk.vector": _vector(),
        "ragfleet.v1.SearchRequest.query_vector": st.one_of(st.just([]), _vector()),
        "ragfleet.v1.Chunk.doc_id": doc_id,
        "ragfleet.v1.Document.doc_id": doc_id,
        "ragfleet.v1.AskRequest.question": question,
        "ragfleet.v1.GenerateRequest.question": question,
        "ragfleet.v1.FieldCondition.field": filter_field,
    }
    passage = common_pb2.Passage(number=1, chunk_id="d#0", doc_id="d", title="Bees",
                                 text="Honeybee colonies swarm in spring to reproduce.")
    seeds = {
        "ask": gateway_pb2.AskRequest(question="Why do honeybee colonies swarm?", top_k=3),
        "ingest": gateway_pb2.IngestRequest(documents=[gateway_pb2.Document(
            doc_id=doc_ids[0], title="Bees", text="Bees dance to share where food is.", metadata={"lang": "en"})]),
        "delete_docs": gateway_pb2.DeleteDocumentsRequest(doc_ids=[doc_ids[-1]]),
        "embed": embedding_pb2.EmbedRequest(texts=["hello bees"], input_type=common_pb2.INPUT_TYPE_QUERY),
        "upsert": retrieval_pb2.UpsertRequest(tenant=tenants[0], chunks=[retrieval_pb2.Chunk(
            chunk_id="x#0", doc_id=doc_ids[0], chunk_index=0, title="Bees", text="Bees make wax.",
            vector=[1.0] + [0.0] * (DIMENSION - 1))]),
        "delete": retrieval_pb2.DeleteRequest(tenant=tenants[0], doc_ids=[doc_ids[-1]]),
        "search": retrieval_pb2.SearchRequest(tenant=tenants[0], query_text="why do bees swarm", top_k=3),
        "generate": generation_pb2.GenerateRequest(question="Why do bees swarm?", passages=[passage]),
    }
    specs = [
        ("gateway", "GatewayService/Ask", gateway_pb2.AskRequest, True, "ask"),
        ("gateway", "GatewayService/Ingest", gateway_pb2.IngestRequest, False, "ingest"),
        ("gateway", "GatewayService/DeleteDocuments", gateway_pb2.DeleteDocumentsRequest, False, "delete_docs"),
        ("embedding", "EmbeddingService/Embed", embedding_pb2.EmbedRequest, False, "embed"),
        ("retrieval", "RetrievalService/Upsert", retrieval_pb2.UpsertRequest, False, "upsert"),
        ("retrieval", "RetrievalService/Delete", retrieval_pb2.DeleteRequest, False, "delete"),
        ("retrieval", "RetrievalService/Search", retrieval_pb2.SearchRequest, False, "search"),
        ("generation", "GenerationService/Generate", generation_pb2.GenerateRequest, True, "generate"),
    ]
    return {name: Target(service, f"/ragfleet.v1.{name}", cls, streaming, (seeds[seed],), hints, timeout)
            for service, name, cls, streaming, seed in specs}


def internal_metadata(mesh: LocalMesh, caller: str = "gateway") -> tuple[tuple[str, str], ...]:
    """Credentials an internal service wants from `caller`: none until service-to-service auth lands; then
    whatever the mesh exposes for its callers (looked up by name so this module works before and after)."""
    for attr in ("caller_metadata", "internal_metadata"):
        helper = getattr(mesh, attr, None)
        if callable(helper):
            return tuple(helper(caller))
    return ()


@dataclass
class FuzzMesh:
    """A four-service mesh on loopback with Redis, API keys, the semantic cache and the sim LLM, seeded with a
    small corpus for the fuzz tenant so Asks reach retrieval and generation with passages."""

    mesh: LocalMesh
    sim: SimLLMProcess
    api_key: str
    tenant: str
    redis_prefix: str
    targets: dict[str, Target]
    tenants: tuple[str, ...]
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    @classmethod
    def start(cls, data_dir: Path, *, timeout: float = 20.0, log_level: str = "WARNING") -> "FuzzMesh":
        run = uuid.uuid4().hex[:8]
        sim = SimLLMProcess(ttft_ms=5, tokens_per_second=2000, max_tokens=16)
        tenant, key, prefix = f"fuzz-{run}", f"fuzz-key-{run}", f"ragfleet-fuzz:{run}:"
        env = {
            "RAGFLEET_LLM_BASE_URL": sim.base_url,
            "RAGFLEET_LLM_MODEL": "sim-llm",
            "RAGFLEET_REDIS_URL": REDIS_URL,
            "RAGFLEET_GATEWAY_REDIS_PREFIX": prefix + "gw:",
            "RAGFLEET_EMBEDDING_L2_PREFIX": prefix + "emb:",
            "RAGFLEET_GATEWAY_API_KEYS": f"{key}={tenant}",
            "RAGFLEET_GATEWAY_SEMANTIC_CACHE": "true",
            "RAGFLEET_GENERATION_FALLBACK": "false",
            "RAGFLEET_GENERATION_MAX_RETRIES": "0",
            "RAGFLEET_LOG_LEVEL": log_level,
        }
        mesh = LocalMesh(data_dir=data_dir, env=env)
        try:
            mesh.start()
        except BaseException:
            mesh.stop()
            sim.stop()
            raise
        doc_ids = ["bees", "honey", "wax"]
        tenants = (tenant, f"other-{run}")
        fm = cls(mesh, sim, key, tenant, prefix, build_targets(tenants, doc_ids, timeout), tenants)
        try:
            fm._seed(doc_ids)
        except BaseException:
            fm.stop()
            raise
        return fm

    def _seed(self, doc_ids: Sequence[str]) -> None:
        docs = [gateway_pb2.Document(doc_id=d, title=d.title(), text=f"Notes about {d}: honeybee colonies swarm in "
                                     f"spring; bees make {d} and dance to share where food is.",
                                     metadata={"lang": "en"}) for d in doc_ids]
        stub = self.channel("gateway").unary_unary("/ragfleet.v1.GatewayService/Ingest",
                                                   request_serializer=gateway_pb2.IngestRequest.SerializeToString,
                                                   response_deserializer=gateway_pb2.IngestResponse.FromString)
        stub(gateway_pb2.IngestRequest(documents=docs), metadata=self.metadata("gateway"), timeout=60)

    def channel(self, service: str) -> grpc.Channel:
        if service not in self.channels:
            limit = 256 * 1024 * 1024
            self.channels[service] = grpc.insecure_channel(
                self.mesh.address(service), options=[("grpc.max_send_message_length", limit),
                                                     ("grpc.max_receive_message_length", limit)])
        return self.channels[service]

    def metadata(self, service: str) -> tuple[tuple[str, str], ...]:
        if service == "gateway":
            return (("authorization", f"Bearer {self.api_key}"),)
        return internal_metadata(self.mesh, "gateway")

    def call(self, target: Target, payload: bytes, *,
             metadata: Sequence[tuple[str, str]] | None = None) -> Outcome:
        """One raw call; the stream (if any) is read to its end."""
        channel = self.channel(target.service)
        md = tuple(self.metadata(target.service) if metadata is None else metadata)
        start = time.monotonic()
        events = 0
        try:
            if target.streaming:
                call = channel.unary_stream(target.path, request_serializer=None, response_deserializer=None)
                for _ in call(payload, metadata=md, timeout=target.timeout):
                    events += 1
            else:
                call = channel.unary_unary(target.path, request_serializer=None, response_deserializer=None)
                call(payload, metadata=md, timeout=target.timeout)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        return Outcome(code, time.monotonic() - start, details, events)

    def health(self) -> dict[str, str]:
        """Every service's overall health status ("SERVING", or the error/exit that stands in for it)."""
        out = {}
        for name in _SERVICES:
            proc = self.mesh.processes[name].process
            if proc.poll() is not None:
                out[name] = f"exited {proc.returncode}"
                continue
            try:
                reply = health_pb2_grpc.HealthStub(self.channel(name)).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10)
                out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                out[name] = exc.code().name
        return out

    def server_errors(self) -> Counter[tuple[str, str, str]]:
        """(service, method, code) -> count of UNKNOWN/INTERNAL/DATA_LOSS RPCs each service recorded so far."""
        counts: Counter[tuple[str, str, str]] = Counter()
        for name in _SERVICES:
            port = self.mesh.metrics_ports[name]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                match = _LABELS.match(line)
                if match is None:
                    continue
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
                if labels.get("code") in FORBIDDEN:
                    counts[(name, labels.get("method", ""), labels["code"])] += int(float(match[2]))
        return counts

    def logs_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {n}\n{p.log_tail(lines)}" for n, p in self.mesh.processes.items())

    def stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        try:
            self.mesh.stop()
        finally:
            self.sim.stop()
            _cleanup_redis(self.redis_prefix, self.tenants)

    def __enter__(self) -> "FuzzMesh":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cleanup_redis(prefix: str, tenants: Sequence[str]) -> None:
    """Delete this run's keys: its own prefix, and retrieval's per-tenant keys (their prefix is fixed)."""
    import redis

    try:
        delete_keys(prefix + "*", *(f"ragfleet:retrieval:*{t}*" for t in tenants), url=REDIS_URL)
    except redis.RedisError:
        pass


def summary(counts: Mapping[str, Counter[str]]) -> str:
    return json.dumps({name: dict(c) for name, c in counts.items()}, indent=1, sort_keys=True)

