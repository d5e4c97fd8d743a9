"""The fault scenarios, shared by tests/faults (small counts, asserted) and bench/faults.py (larger counts, recorded).

Each scenario drives a FaultMesh (tests/faults/_mesh.py) through one fault and returns plain figures; every wait is
bounded, and the fault is undone in ``finally`` so a failing scenario does not poison the next one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.faults._mesh import SIM_DEFAULTS, FaultMesh
from tests.faults._procs import connections_to, metric, metrics, sigkill

WORDS = ("amber basalt cobalt dune ember fjord geyser harbor iris jasper kelp lagoon mica nectar orchid pumice quartz "
         "reef sierra tundra umber violet willow xenon yarrow zephyr").split()


@dataclass
class AskResult:
    code: str  # grpc.StatusCode name
    elapsed: float  # seconds from the call to its end
    started: float  # monotonic
    ended: float
    deltas: int = 0
    fallback_used: bool = False
    details: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    passages: list[str] = field(default_factory=list)  # doc_ids of the Sources event


def unique(text: str) -> str:
    return f"[{uuid.uuid4().hex[:8]}] {text}"


async def ask(stub: gateway_pb2_grpc.GatewayServiceStub, fm: FaultMesh, question: str, *, deadline: float,
              **fields: Any) -> AskResult:
    """One Ask, read to its end; never raises for a status (the status is the result)."""
    started = time.monotonic()
    result = AskResult("OK", 0.0, started, started)
    try:
        call = stub.Ask(gateway_pb2.AskRequest(question=question, **fields), metadata=fm.metadata, timeout=deadline)
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "sources":
                result.passages = [p.doc_id for p in event.sources.passages]
            elif kind == "delta":
                result.deltas += 1
            elif kind == "finished":
                result.fallback_used = event.finished.fallback_used
                t = event.finished.timings
                result.timings = {"embed": t.embed_ms, "retrieve": t.retrieve_ms, "cache": t.cache_ms,
                                  "first_token": t.first_token_ms, "total": t.total_ms}
    except grpc.aio.AioRpcError as exc:
        result.code, result.details = exc.code().name, exc.details() or ""
    result.ended = time.monotonic()
    result.elapsed = result.ended - started
    return result


def summary(results: list[AskResult]) -> dict[str, Any]:
    return {"asks": len(results), "codes": dict(Counter(r.code for r in results)),
            "max_elapsed_s": round(max((r.elapsed for r in results), default=0.0), 3)}


# -- Redis unreachable mid-load ------------------------------------------------------------------------------------


async def redis_outage(fm: FaultMesh, *, askers: int = 3, up_s: float = 1.0, down_s: float = 3.0,
                       after_s: float = 2.0, deadline: float = 10.0, l2_wait_s: float = 15.0) -> dict[str, Any]:
    """Asks run before, during and after Redis becomes unreachable (proxy cut: refused connects, resets).

    Each asker alternates a repeated question (served from the response cache while Redis is up) with a new one
    (a full miss: embedding, retrieval and generation all consult their Redis L2)."""
    phase = "up"
    results: dict[str, list[AskResult]] = {"up": [], "down": [], "after": []}
    stop = asyncio.Event()
    repeated = [unique(f"Which mineral is {w} related to?") for w in WORDS[:askers]]

    async with grpc.aio.insecure_channel(fm.gateway()) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def asker(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                question = repeated[i] if n % 2 else unique(f"What does {WORDS[(i + n) % len(WORDS)]} mean?")
                at = phase
                results[at].append(await ask(stub, fm, question, deadline=deadline))

        gateway_metrics, embedding_metrics = (fm.mesh.processes[n].metrics_port for n in ("gateway", "embedding"))
        tasks = [asyncio.create_task(asker(i)) for i in range(askers)]
        try:
            await asyncio.sleep(up_s)
            before = (metrics(gateway_metrics), metrics(embedding_metrics))
            await asyncio.to_thread(fm.redis.cut)
            phase = "down"
            await asyncio.sleep(down_s)
            during = (metrics(gateway_metrics), metrics(embedding_metrics))
            keys_at_restore = (fm.redis_keys(fm.gateway_prefix), fm.redis_keys(fm.embedding_prefix))
            bytes_at_restore = fm.redis.bytes_forwarded
            await asyncio.to_thread(fm.redis.restore)
            restored = time.monotonic()
            phase = "after"
            await asyncio.sleep(after_s)
            # L2 in use again: new answers and new query embeddings are written to Redis once more.
            l2_back_s = None
            while time.monotonic() - restored < l2_wait_s:
                keys = (fm.redis_keys(fm.gateway_prefix), fm.redis_keys(fm.embedding_prefix))
                if keys[0] > keys_at_restore[0] and keys[1] > keys_at_restore[1]:
                    l2_back_s = round(time.monotonic() - restored, 2)
                    break
                await asyncio.sleep(0.25)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), deadline + 5)
            await asyncio.to_thread(fm.redis.restore)
    return {
        "phases": {name: summary(r) for name, r in results.items()},
        "failed_while_down": sum(r.code != "OK" for r in results["down"]),
        "failed_total": sum(r.code != "OK" for rs in results.values() for r in rs),
        "bypassed_cache_lookups_while_down": metric(during[0], "ragfleet_gateway_cache_lookups_total", result="error")
        - metric(before[0], "ragfleet_gateway_cache_lookups_total", result="error"),
        "embedding_redis_errors_while_down": metric(during[1], "ragfleet_embedding_redis_errors_total")
        - metric(before[1], "ragfleet_embedding_redis_errors_total"),
        "redis_bytes_after_restore": fm.redis.bytes_forwarded - bytes_at_restore,
        "l2_back_after_s": l2_back_s,
    }


# -- SIGKILL during streams and ingest -----------------------------------------------------------------------------


async def kill_during_load(fm: FaultMesh, service: str, *, askers: int = 3, kill_after_s: float = 1.0,
                           down_s: float = 0.3, after_s: float = 1.0, deadline: float = 8.0) -> dict[str, Any]:
    """SIGKILL `service` while Ask streams are open and documents are being ingested, restart it on the same data
    dir, then check every acknowledged document is searchable exactly once and no stream outlived the kill."""
    run = uuid.uuid4().hex[:6]
    asks: list[AskResult] = []
    acked: list[str] = []
    failed: list[str] = []
    texts: dict[str, str] = {}
    stop = asyncio.Event()
    # Streams long enough (~1.5 s) that a kill of generation finds several of them mid-answer.
    await asyncio.to_thread(fm.sim.configure, tokens_per_second=20.0, max_tokens=30)

    def document(doc_id: str) -> gateway_pb2.Document:
        return gateway_pb2.Document(doc_id=doc_id, title=f"Fault note {doc_id}", text=texts[doc_id])

    async with grpc.aio.insecure_channel(fm.gateway()) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def asker(i: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                result = await ask(stub, fm, unique(f"Tell me about {WORDS[(i * 7 + n) % len(WORDS)]}."),
                                   deadline=deadline, bypass_cache=True)
                asks.append(result)
                if result.code != "OK":
                    await asyncio.sleep(0.1)  # a client backs off a little instead of spinning on a dead service

        async def ingester() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                doc_id = f"kill-{service}-{run}-{n}"
                words = " ".join(WORDS[(n * k) % len(WORDS)] for k in range(1, 9))
                texts[doc_id] = f"Field note {n} of run {run} while {service} is killed: {words}."
                try:
                    await stub.Ingest(gateway_pb2.IngestRequest(documents=[document(doc_id)]),
                                      metadata=fm.metadata, timeout=deadline)
                    acked.append(doc_id)
                except grpc.aio.AioRpcError:
                    failed.append(doc_id)
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(asker(i)) for i in range(askers)] + [asyncio.create_task(ingester())]
        try:
            await asyncio.sleep(kill_after_s)
            killed = time.monotonic()
            await asyncio.to_thread(sigkill, fm.mesh, service)
            await asyncio.sleep(down_s)
            await asyncio.to_thread(fm.mesh.restart, service, timeout=60.0)
            back = time.monotonic()
            await asyncio.sleep(after_s)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), deadline + 10)
            await asyncio.to_thread(fm.sim.configure, **SIM_DEFAULTS)

        # A client retries what was not acknowledged; replaying a document must not duplicate it.
        replayed: list[str] = []
        for doc_id in failed:
            for _ in range(40):
                try:
                    await stub.Ingest(gateway_pb2.IngestRequest(documents=[document(doc_id)]),
                                      metadata=fm.metadata, timeout=deadline)
                    replayed.append(doc_id)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.25)
        expected = set(acked) | set(replayed)
        found = await _find_documents(stub, fm, sorted(expected), deadline=deadline)

    open_at_kill = [a for a in asks if a.started < killed < a.ended]
    hanging = [a for a in asks if a.code == "DEADLINE_EXCEEDED" or a.elapsed >= deadline]
    return {
        "service": service,
        "asks": summary(asks),
        "open_at_kill": len(open_at_kill),
        "open_at_kill_codes": dict(Counter(a.code for a in open_at_kill)),
        "open_at_kill_max_end_after_kill_s": round(max((a.ended - killed for a in open_at_kill), default=0.0), 3),
        "mid_answer_at_kill": sum(1 for a in open_at_kill if a.deltas),
        "unexpected_codes": sorted({a.code for a in asks} - {"OK", "UNAVAILABLE"}),
        "hanging_streams": len(hanging),
        "restart_s": round(back - killed, 2),
        "acked_documents": len(acked),
        "failed_then_replayed": f"{len(replayed)}/{len(failed)}",
        "lost_documents": sorted(d for d in expected if found.get(d, 0) == 0),
        "duplicated_documents": sorted(d for d in expected if found.get(d, 0) > 1),
    }


async def _find_documents(stub: gateway_pb2_grpc.GatewayServiceStub, fm: FaultMesh, doc_ids: list[str], *,
                          deadline: float, group: int = 40) -> dict[str, int]:
    """How many passages each document has in the index: dense Asks filtered to a group of doc_ids, top_k above
    the group size, so every stored chunk of the group comes back (each test document is one chunk)."""
    counts: Counter[str] = Counter()
    for start in range(0, len(doc_ids), group):
        ids = doc_ids[start:start + group]
        result = None
        for _ in range(20):  # the mesh may still be reconnecting to the restarted service
            result = await ask(stub, fm, "field note of the run", deadline=deadline, bypass_cache=True, top_k=50,
                               mode=common_pb2.SEARCH_MODE_DENSE,
                               filters=[common_pb2.FieldCondition(field="doc_id", any_of=ids)])
            if result.code == "OK":
                break
            await asyncio.sleep(0.25)
        assert result is not None and result.code == "OK", f"verification Ask failed: {result}"
        counts.update(result.passages)
    return dict(counts)


# -- the LLM misbehaving --------------------------------------------------------------------------------------------

# name -> (sim settings, client deadline, expected without fallback, expected with fallback or None = not run there)
# An expectation is (status, "deltas": whether text arrived before it).
LLM_FAULTS: dict[str, tuple[dict[str, Any], float, tuple[str, bool], tuple[str, bool] | None]] = {
    "slow": ({"ttft_ms": 400.0, "tokens_per_second": 40.0, "max_tokens": 12}, 5.0, ("OK", True), None),
    "slow_past_deadline": ({"tokens_per_second": 5.0, "max_tokens": 40}, 2.0, ("DEADLINE_EXCEEDED", True), None),
    "hung": ({"hang_rate": 1.0}, 5.0, ("UNAVAILABLE", False), ("FALLBACK", True)),
    # Retry-After 0.5 s: one retry, no sooner than asked. 30 s: more than an attempt's first-token budget, so no
    # retry at all (the fallback answers at once).
    "rate_limited_429": ({"rate_limit_rate": 1.0, "retry_after_seconds": 0.5}, 5.0, ("UNAVAILABLE", False),
                         ("FALLBACK", True)),
    "rate_limited_429_long_retry_after": ({"rate_limit_rate": 1.0, "retry_after_seconds": 30.0}, 5.0,
                                          ("UNAVAILABLE", False), ("FALLBACK", True)),
    "server_error_500": ({"failure_rate": 1.0}, 5.0, ("UNAVAILABLE", False), ("FALLBACK", True)),
    "malformed_sse_first": ({"malformed_after_tokens": 0}, 5.0, ("UNAVAILABLE", False), ("FALLBACK", True)),
    "malformed_sse_mid": ({"malformed_after_tokens": 4}, 5.0, ("UNAVAILABLE", True), None),
    "reset_before_first_token": ({"reset_after_tokens": 0}, 5.0, ("UNAVAILABLE", False), ("FALLBACK", True)),
    "reset_mid_stream": ({"reset_after_tokens": 4}, 5.0, ("UNAVAILABLE", True), None),
}


def _llm_state(fm: FaultMesh, fallback: bool) -> dict[str, Any]:
    mesh = fm.fallback if fallback else fm.mesh
    gen = metrics(mesh.processes["generation"].metrics_port)
    gw = metrics(mesh.processes["gateway"].metrics_port)
    return {"connections": dict(connections_to(fm.generation_pid(fallback), fm.sim_port)),
            "active_generate_streams": metric(gen, "ragfleet_generation_active_streams"),
            "gateway_asks_in_flight": metric(gw, "ragfleet_gateway_asks_in_flight")}


async def llm_fault(fm: FaultMesh, name: str, *, concurrency: int = 3, rounds: int = 2) -> dict[str, Any]:
    """Run `rounds` waves of `concurrency` Asks while the sim LLM misbehaves as `name`, through the gateway whose
    generation has no fallback and (for faults before the first token) the one with fallback, concurrently.

    Leaks: a stream that never releases its LLM connection makes the next wave open new ones, so after the waves
    generation may hold at most max(baseline, concurrency) established connections to the LLM, none in CLOSE_WAIT,
    with no Generate stream or Ask left in flight and no stream left open at the LLM."""
    settings, deadline, plain, with_fallback = LLM_FAULTS[name]
    variants = [False] + ([True] if with_fallback else [])
    idle = lambda: fm.sim.wait_for(lambda s: s["active_streams"] == 0, timeout=5.0)  # noqa: E731
    await asyncio.to_thread(idle)
    before = {v: _llm_state(fm, v) for v in variants}
    results: dict[bool, list[AskResult]] = {v: [] for v in variants}
    requests_before = (await asyncio.to_thread(fm.sim.stats))["chat_requests"]
    await asyncio.to_thread(fm.sim.configure, **{**SIM_DEFAULTS, **settings})
    try:
        channels = {v: grpc.aio.insecure_channel(fm.gateway(v)) for v in variants}
        try:
            stubs = {v: gateway_pb2_grpc.GatewayServiceStub(c) for v, c in channels.items()}
            for wave in range(rounds):
                batch = [(v, ask(stubs[v], fm, unique(f"{name} wave {wave}: what is {WORDS[i]}?"), deadline=deadline,
                                 bypass_cache=True)) for v in variants for i in range(concurrency)]
                done = await asyncio.wait_for(asyncio.gather(*(c for _, c in batch)), deadline + 5)
                for (v, _), result in zip(batch, done):
                    results[v].append(result)
        finally:
            for channel in channels.values():
                await channel.close()
    finally:
        await asyncio.to_thread(fm.sim.configure, **SIM_DEFAULTS)
    sim_idle = (await asyncio.to_thread(idle))["active_streams"] == 0
    llm_requests = (await asyncio.to_thread(fm.sim.stats))["chat_requests"] - requests_before
    out: dict[str, Any] = {"fault": name, "deadline_s": deadline, "sim_streams_left_open": 0 if sim_idle else 1,
                           "llm_requests_per_ask": round(llm_requests / sum(map(len, results.values())), 2)}
    for v in variants:
        expected = with_fallback if v else plain
        after = _llm_state(fm, v)
        established = after["connections"].get("ESTABLISHED", 0)
        allowed = max(before[v]["connections"].get("ESTABLISHED", 0), concurrency)
        outcomes = [("FALLBACK" if r.fallback_used else r.code, r.deltas > 0) for r in results[v]]
        out["fallback" if v else "no_fallback"] = {
            "expected": {"status": expected[0], "deltas": expected[1]},
            "outcomes": dict(Counter(f"{s}{'+deltas' if d else ''}" for s, d in outcomes)),
            "as_documented": sum(o == expected for o in outcomes),
            "asks": len(outcomes),
            "max_elapsed_s": round(max(r.elapsed for r in results[v]), 3),
            "min_elapsed_s": round(min(r.elapsed for r in results[v]), 3),
            "over_deadline": sum(r.elapsed > deadline + 0.25 for r in results[v]),
            "details": sorted({r.details[:160] for r in results[v] if r.details})[:3],
            "connections_before": before[v]["connections"], "connections_after": after["connections"],
            "leaked_connections": max(0, established - allowed) + after["connections"].get("CLOSE_WAIT", 0),
            "generate_streams_left": after["active_generate_streams"],
            "asks_left_in_flight": after["gateway_asks_in_flight"],
        }
    return out


# -- latency between two services ----------------------------------------------------------------------------------

SLOW_HOPS: dict[str, tuple[str, float, float, str]] = {
    # name -> (proxy, one-way delay, client deadline, expectation)
    "retrieval_slow_within_budget": ("retrieval", 0.15, 8.0, "OK"),
    "retrieval_past_stage_budget": ("retrieval", 0.7, 8.0, "DEADLINE_EXCEEDED:retrieval"),
    "embedding_past_stage_budget": ("embedding", 0.7, 8.0, "DEADLINE_EXCEEDED:embedding"),
    "retrieval_past_client_deadline": ("retrieval", 0.4, 0.6, "DEADLINE_EXCEEDED"),
}


async def slow_hop(fm: FaultMesh, name: str, *, count: int = 3) -> dict[str, Any]:
    """Asks while one gateway -> upstream hop has added latency (both directions)."""
    hop, delay, deadline, expectation = SLOW_HOPS[name]
    proxy = getattr(fm, hop)
    proxy.delay = delay
    try:
        async with grpc.aio.insecure_channel(fm.gateway()) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            results = await asyncio.wait_for(asyncio.gather(*(
                ask(stub, fm, unique(f"slow {hop}: what is {WORDS[i % len(WORDS)]}?"), deadline=deadline,
                    bypass_cache=True) for i in range(count))), deadline + 5)
    finally:
        proxy.delay = 0.0
    return {"hop": f"gateway->{hop}", "one_way_delay_s": delay, "deadline_s": deadline, "expected": expectation,
            "codes": dict(Counter(r.code for r in results)), "max_elapsed_s": round(max(r.elapsed for r in results), 3),
            "details": sorted({r.details[:160] for r in results if r.details}),
            "slowest_stage": dict(Counter(max(("embed", "retrieve"), key=lambda s: r.timings.get(s, 0.0))
                                          for r in results if r.timings)),
            "results": [asdict(r) for r in results]}
