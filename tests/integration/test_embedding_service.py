"""The embedding service as a real process (LocalMesh): wire contract, bad input, merged batches in the metrics,
the Redis L2 shared by replicas, Redis unreachable, a full queue, and a cancelled RPC freeing its queue slots."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from services.cli.mesh import LocalMesh, free_port
from services.runtime.pb.ragfleet.v1 import common_pb2, embedding_pb2 as pb, embedding_pb2_grpc
from tests.conftest import REDIS_URL

SCIFACT = Path("/work/shared/data/scifact/corpus.jsonl")


def abstracts(n: int, skip: int = 0) -> list[str]:
    """Long real texts (SciFact abstracts): each keeps the CPU model busy for a while."""
    out = []
    with SCIFACT.open() as handle:
        for line in handle:
            text = json.loads(line)["text"]
            if len(text) > 1500:
                out.append(text)
            if len(out) >= n + skip:
                break
    return out[skip:]


def metric(mesh: LocalMesh, name: str) -> float:
    port = mesh.processes["embedding"].metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", body, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    prefix = f"ragfleet-test:{uuid.uuid4().hex[:12]}:emb:"
    env = {"RAGFLEET_REDIS_URL": REDIS_URL, "RAGFLEET_EMBEDDING_L2_PREFIX": prefix, "RAGFLEET_LOG_LEVEL": "WARNING"}
    mesh = LocalMesh(data_dir=tmp_path_factory.mktemp("embedding"), env=env)
    mesh.start(["embedding"])
    try:
        yield mesh, prefix
    finally:
        mesh.stop()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def no_redis_small_queue(tmp_path_factory):
    """Redis pointed at a closed port, and a queue of only 16 texts. The float32 compute on one batch at a time keeps
    the model busy for over a second with 16 abstracts, long enough to fill and cancel the queue behind it (int8
    runs two batches at once and finishes them in a third of the time)."""
    env = {"RAGFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "RAGFLEET_EMBEDDING_QUEUE_CAPACITY": "16",
           "RAGFLEET_EMBEDDING_ONNX_COMPUTE": "float32",
           "RAGFLEET_EMBEDDING_MAX_TEXTS": "16",
           "RAGFLEET_EMBEDDING_MAX_BATCH_TOKENS": "8192", "RAGFLEET_LOG_LEVEL": "WARNING"}
    mesh = LocalMesh(data_dir=tmp_path_factory.mktemp("embedding-no-redis"), env=env)
    mesh.start(["embedding"])
    try:
        yield mesh
    finally:
        mesh.stop()


def stub_for(mesh: LocalMesh) -> embedding_pb2_grpc.EmbeddingServiceStub:
    channel = mesh.internal_channel("embedding", aio=True)
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    stub.channel = channel  # type: ignore[attr-defined]  # an unreferenced aio channel closes when collected
    return stub


async def test_embed_over_the_wire_with_cache_flags(service):
    mesh, prefix = service
    stub = stub_for(mesh)
    texts = [f"Aspirin lowers the risk of heart attack {uuid.uuid4().hex[:6]}", "Vitamin D and bone density"]
    first = await stub.Embed(pb.EmbedRequest(texts=texts, input_type=common_pb2.INPUT_TYPE_QUERY), timeout=30)
    assert first.model == "all-MiniLM-L6-v2-onnx-int8-dynamic-int8" and first.dimension == 384
    assert [len(e.values) for e in first.embeddings] == [384, 384]
    assert all(e.token_count > 3 and not e.truncated for e in first.embeddings)
    assert np.linalg.norm(first.embeddings[0].values) == pytest.approx(1.0, abs=1e-4)
    again = await stub.Embed(pb.EmbedRequest(texts=texts[::-1], input_type=common_pb2.INPUT_TYPE_QUERY), timeout=30)
    assert [e.cached for e in again.embeddings] == [True, True]
    assert list(again.embeddings[1].values) == pytest.approx(list(first.embeddings[0].values), abs=1e-7)
    # Written to the shared L2 as raw float32 bytes under the configured prefix.
    client = redis.Redis.from_url(REDIS_URL)
    assert len(list(client.scan_iter(match=prefix + "*"))) >= 2
    client.close()
    long_text = (await asyncio.to_thread(abstracts, 1))[0] * 3
    truncated = await stub.Embed(pb.EmbedRequest(texts=[long_text]), timeout=30)
    assert truncated.embeddings[0].truncated and truncated.embeddings[0].token_count == 256


@pytest.mark.parametrize("request_, detail", [
    (pb.EmbedRequest(), "texts: at least one text is required"),
    (pb.EmbedRequest(texts=["fine", "  "]), "texts[1]: empty text"),
    (pb.EmbedRequest(texts=["x"] * 257), "texts: 257 texts in one request; the maximum is 256"),
    (pb.EmbedRequest(texts=["y" * 100_001]), "texts[0]: 100001 characters; the maximum is 100000"),
    (pb.EmbedRequest(texts=["x"], input_type=9), "input_type: unknown value 9"),
])
async def test_bad_input_is_invalid_argument_naming_field_and_limit(service, request_, detail):
    mesh, _ = service
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        stub = stub_for(mesh)  # held: an intercepted call starts after this line
        await stub.Embed(request_, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in raised.value.details()


async def test_concurrent_calls_merge_and_each_gets_its_own_vector(service):
    mesh, _ = service
    stub = stub_for(mesh)
    texts = [f"claim {i}: {'protein ' * (i % 9)}expression in cells {uuid.uuid4().hex[:4]}" for i in range(64)]
    batches_before = metric(mesh, "ragfleet_embedding_batch_size_count")
    replies = await asyncio.gather(*(stub.Embed(pb.EmbedRequest(texts=[t]), timeout=60) for t in texts))
    batches = metric(mesh, "ragfleet_embedding_batch_size_count") - batches_before
    # The default int8 compute spreads queued texts over its two model slots rather than merging them all into one
    # call (af41d8a): 64 callers arriving together still share calls (36 here under CI load, ~20 when quiet), never
    # one call each.
    assert batches < 48, f"64 concurrent callers ran in {batches} batches"
    for i in (0, 17, 63):
        alone = await stub.Embed(pb.EmbedRequest(texts=[texts[i]], bypass_cache=True), timeout=30)
        cosine = float(np.dot(replies[i].embeddings[0].values, alone.embeddings[0].values))
        assert cosine > 0.99999, f"caller {i} did not get its own vector"


async def test_redis_unreachable_still_serves_every_request(no_redis_small_queue):
    mesh = no_redis_small_queue
    stub = stub_for(mesh)
    texts = [f"redis is down, query {i}" for i in range(12)]
    for _ in range(2):
        replies = await asyncio.gather(*(stub.Embed(pb.EmbedRequest(texts=[t]), timeout=30) for t in texts))
        assert all(len(r.embeddings[0].values) == 384 for r in replies)
    assert all(r.embeddings[0].cached for r in replies)  # L1 carries on
    assert metric(mesh, "ragfleet_embedding_redis_errors_total") >= 1


async def test_full_queue_is_resource_exhausted_and_cancel_frees_slots(no_redis_small_queue):
    mesh = no_redis_small_queue
    stub = stub_for(mesh)
    long_texts = await asyncio.to_thread(abstracts, 49)
    ran_before = metric(mesh, "ragfleet_embedding_batch_size_sum")
    # Keep the model busy (16 abstracts: a second or more on 2 cores), then fill the 16-text queue behind it.
    busy = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(texts=long_texts[:16], bypass_cache=True), timeout=60))
    await asyncio.sleep(0.2)
    queued = stub.Embed(pb.EmbedRequest(texts=long_texts[16:32], bypass_cache=True), timeout=60)
    queued_task = asyncio.ensure_future(queued)
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(pb.EmbedRequest(texts=long_texts[32:33], bypass_cache=True), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in raised.value.details()
    assert time.perf_counter() - started < 0.5  # refused at once, not after queueing
    queued.cancel()
    await asyncio.sleep(0.1)
    assert metric(mesh, "ragfleet_embedding_queue_depth") == 0
    admitted = await stub.Embed(pb.EmbedRequest(texts=long_texts[33:49], bypass_cache=True), timeout=60)
    assert len(admitted.embeddings) == 16
    await busy
    with pytest.raises(asyncio.CancelledError):
        await queued_task
    # The cancelled request's 16 texts never reached the model.
    assert metric(mesh, "ragfleet_embedding_batch_size_sum") - ran_before == 32
