"""The bare mesh: four grpc.aio processes with an Ask's call graph, message sizes and streaming shape, doing no work.

The floor every mesh overhead is set against (issue 12): what Python gRPC itself costs for the same four hops on this
machine, measured in the same run as the real mesh. No interceptors, auth, caches, metrics or tracing; canned
responses of the real sizes (a 384-d vector per text, top_k hits of a 200-token chunk each).

    gateway.Ask ──Embed (unary)──> embedding        canned vector
                ──Search (unary)─> retrieval        canned hits
                ──Generate (server stream)─> generation ──HTTP SSE──> sim LLM (or canned deltas, no LLM)
    then Sources, one delta per token relayed, AskFinished (StageTimings: embed, retrieve, first token, total).

An Ask with bypass_cache=False is answered like a response-cache hit (Sources, one delta, AskFinished, no hop);
with bypass_cache=True it runs the four hops. AskRequest.params.max_tokens sets the answer's tokens (canned, or
asked of the sim). Standalone report (sim LLM as its own process; add --write for bench/results/bare_mesh.*):

    flock /tmp/ragfleet-bench.lock .venv/bin/python -m bench._bare_mesh [--write]

From another benchmark:

    floor = await measure_floor(asks=300, streams=100)   # starts the sim and the bare mesh, stops both
    async with BareMesh(sse_url=None) as mesh: ...          # canned answers; mesh.address("gateway"), mesh.pids
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any, AsyncIterator

import aiohttp
import grpc
import uvloop

from bench._common import LOAD_SIM, ROOT, percentiles, stop_process, write_results
from bench._sim import SimProcess, cpu_seconds
from services.cli.mesh import free_port
from services.generation.sse import SSEDecoder, decode_data, is_done
from services.runtime.pb.ragfleet.v1 import (common_pb2, embedding_pb2, embedding_pb2_grpc, gateway_pb2,
                                             gateway_pb2_grpc, generation_pb2, generation_pb2_grpc, retrieval_pb2,
                                             retrieval_pb2_grpc)

ROLES = ("embedding", "retrieval", "generation", "gateway")
DIMENSION = 384
PASSAGE_CHARS = 900  # a 200-token chunk (the gateway's default chunk size) of the sample corpus
DEFAULT_TOP_K = 5
ANSWER_CHARS = 400  # the cached replay's one delta, as in bench/_floor_server.py
CANNED_TOKEN = " word"
QUESTION = "How do honey bees tell each other where flowers are?"
# As bench/ask_cost.py: one-token answers for the fixed cost, the load sim for the cost per token.
ONE_TOKEN_SIM = {"ttft_ms": 0.0, "tokens_per_second": 5000.0, "max_tokens": 1}
RAMP_SECONDS = 5.0

_VECTOR = [1.0 / DIMENSION ** 0.5] * DIMENSION


def _hits(top_k: int) -> list[retrieval_pb2.SearchHit]:
    return [retrieval_pb2.SearchHit(chunk_id=f"doc-{i}:0", doc_id=f"doc-{i}", chunk_index=0, title=f"Document {i}",
                                    text="x" * PASSAGE_CHARS, score=1.0 / i, metadata={"source": f"doc-{i}.md"})
            for i in range(1, top_k + 1)]


# -- the four servicers ---------------------------------------------------------------------------------------------

class BareEmbedding(embedding_pb2_grpc.EmbeddingServiceServicer):
    async def Embed(self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> embedding_pb2.EmbedResponse:
        return embedding_pb2.EmbedResponse(
            embeddings=[embedding_pb2.Embedding(values=_VECTOR, token_count=12) for _ in request.texts],
            model="bare", dimension=DIMENSION)


class BareRetrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self) -> None:
        self._responses: dict[int, retrieval_pb2.SearchResponse] = {}

    async def Search(self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
                     ) -> retrieval_pb2.SearchResponse:
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k not in self._responses:
            self._responses[top_k] = retrieval_pb2.SearchResponse(hits=_hits(top_k), corpus_version=1,
                                                                  timings_ms={"dense": 0.0, "sparse": 0.0})
        return self._responses[top_k]


class BareGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Relays an OpenAI-compatible SSE stream one delta per token (sse_url set) or streams canned deltas."""

    def __init__(self, sse_url: str | None) -> None:
        self._url = f"{sse_url}/chat/completions" if sse_url else None
        self._http: aiohttp.ClientSession | None = None

    async def Generate(self, request: generation_pb2.GenerateRequest,  # type: ignore[override]
                       context: grpc.aio.ServicerContext) -> AsyncIterator[generation_pb2.GenerateResponse]:
        tokens = request.params.max_tokens if request.params.HasField("max_tokens") else 1
        emitted = 0
        deltas = self._relay(request, tokens) if self._url is not None else _canned(tokens)
        async for text in deltas:
            emitted += 1
            yield generation_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=text))
        yield generation_pb2.GenerateResponse(finished=generation_pb2.GenerationFinished(
            finish_reason=common_pb2.FINISH_REASON_STOP, model="bare",
            usage=common_pb2.Usage(prompt_tokens=1000, completion_tokens=emitted, total_tokens=1000 + emitted)))

    async def _relay(self, request: generation_pb2.GenerateRequest, tokens: int) -> AsyncIterator[str]:
        """The least a relay does: the prompt (passages in), the body read raw over aiohttp (the transport the
        service's SDK client uses) and split into events by the service's own SSE decoder (one json.loads per event),
        the delta's text out. No SDK request building, coalescing, token counting, metrics or tracing."""
        assert self._url is not None
        if self._http is None:  # made on the server's loop
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                               timeout=aiohttp.ClientTimeout(total=60))
        context = "\n\n".join(f"[{p.number}] {p.title}\n{p.text}" for p in request.passages)
        body = {"model": "sim-llm", "stream": True, "max_tokens": tokens,
                "messages": [{"role": "system", "content": "Answer from the numbered sources; cite them as [n]."},
                             {"role": "user", "content": f"{context}\n\nQuestion: {request.question}"}]}
        decoder = SSEDecoder()
        async with self._http.post(self._url, json=body) as response:
            response.raise_for_status()
            async for raw in response.content.iter_any():
                for event, data in decoder.feed(raw):
                    if is_done(data):
                        return
                    chunk = decode_data(event, data)
                    choices = chunk.get("choices") if chunk else None
                    if choices and (text := choices[0].get("delta", {}).get("content")):
                        yield text


async def _canned(tokens: int) -> AsyncIterator[str]:
    for _ in range(tokens):
        yield CANNED_TOKEN


class BareGateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, embedding: str, retrieval: str, generation: str) -> None:
        self._channels = [grpc.aio.insecure_channel(a) for a in (embedding, retrieval, generation)]
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channels[0])
        self._retrieval = retrieval_pb2_grpc.RetrievalServiceStub(self._channels[1])
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channels[2])
        self._cached_sources = gateway_pb2.Sources(passages=_passages(_hits(DEFAULT_TOP_K)))

    async def Ask(self, request: gateway_pb2.AskRequest,  # type: ignore[override]
                  context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.AskResponse]:
        started = time.perf_counter()
        timings = gateway_pb2.StageTimings()
        if not request.bypass_cache:  # the shape of a response-cache hit: three messages, no hop
            yield gateway_pb2.AskResponse(sources=self._cached_sources)
            yield gateway_pb2.AskResponse(delta=common_pb2.TextDelta(text="y" * ANSWER_CHARS))
            timings.first_token_ms = timings.total_ms = _ms_since(started)
            yield gateway_pb2.AskResponse(finished=gateway_pb2.AskFinished(
                finish_reason=common_pb2.FINISH_REASON_STOP, cache_status=gateway_pb2.CACHE_STATUS_HIT_EXACT,
                timings=timings, model="bare"))
            return
        embedded = await self._embedding.Embed(embedding_pb2.EmbedRequest(
            texts=[request.question], input_type=common_pb2.INPUT_TYPE_QUERY), timeout=10)
        timings.embed_ms = _ms_since(started)
        top_k = request.top_k or DEFAULT_TOP_K
        found = await self._retrieval.Search(retrieval_pb2.SearchRequest(
            tenant="default", query_text=request.question, query_vector=embedded.embeddings[0].values, top_k=top_k,
            mode=request.mode), timeout=10)
        timings.retrieve_ms = _ms_since(started) - timings.embed_ms
        passages = _passages(found.hits)
        yield gateway_pb2.AskResponse(sources=gateway_pb2.Sources(passages=passages))
        finished = generation_pb2.GenerationFinished()
        async for event in self._generation.Generate(generation_pb2.GenerateRequest(
                question=request.question, passages=passages, history=[], params=request.params), timeout=60):
            if event.WhichOneof("event") == "delta":
                if not timings.first_token_ms:
                    timings.first_token_ms = _ms_since(started)
                yield gateway_pb2.AskResponse(delta=event.delta)
            else:
                finished = event.finished
        timings.total_ms = _ms_since(started)
        yield gateway_pb2.AskResponse(finished=gateway_pb2.AskFinished(
            finish_reason=finished.finish_reason, usage=finished.usage, cache_status=gateway_pb2.CACHE_STATUS_BYPASS,
            timings=timings, model=finished.model))


def _passages(hits: Any) -> list[common_pb2.Passage]:
    return [common_pb2.Passage(number=i, chunk_id=h.chunk_id, doc_id=h.doc_id, title=h.title, text=h.text,
                               score=h.score, metadata=h.metadata) for i, h in enumerate(hits, start=1)]


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


async def serve(role: str, port: int, *, sse_url: str | None = None, upstreams: dict[str, str] | None = None) -> None:
    server = grpc.aio.server()
    if role == "embedding":
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(BareEmbedding(), server)
    elif role == "retrieval":
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(BareRetrieval(), server)
    elif role == "generation":
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(BareGeneration(sse_url), server)
    else:
        up = upstreams or {}
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            BareGateway(up["embedding"], up["retrieval"], up["generation"]), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the processes --------------------------------------------------------------------------------------------------

class BareMesh:
    """The four bare servers as processes on free ports; `sse_url` None streams canned deltas instead of relaying."""

    def __init__(self, *, sse_url: str | None = None) -> None:
        self.sse_url = sse_url
        self.ports = {role: free_port() for role in ROLES}
        self.processes: dict[str, subprocess.Popen] = {}

    def address(self, role: str) -> str:
        return f"127.0.0.1:{self.ports[role]}"

    @property
    def pids(self) -> dict[str, int]:
        return {role: p.pid for role, p in self.processes.items()}

    def start(self, timeout: float = 60.0) -> "BareMesh":
        for role in ROLES:
            args = [sys.executable, "-m", "bench._bare_mesh", "serve", role, "--port", str(self.ports[role])]
            if role == "generation" and self.sse_url:
                args += ["--sse-url", self.sse_url]
            if role == "gateway":
                args += [f"--{up}={self.address(up)}" for up in ROLES[:3]]
            self.processes[role] = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for role in ROLES:
                with grpc.insecure_channel(self.address(role)) as channel:
                    grpc.channel_ready_future(channel).result(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()  # all at once: they drain side by side
        for process in self.processes.values():
            stop_process(process)
        self.processes.clear()

    async def __aenter__(self) -> "BareMesh":
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


# -- measurements ---------------------------------------------------------------------------------------------------

async def ask(stub: gateway_pb2_grpc.GatewayServiceStub, *, bypass_cache: bool = True, max_tokens: int = 1
              ) -> tuple[float, float, int, gateway_pb2.AskFinished | None]:
    """(TTFT ms, total ms, deltas, AskFinished) of one Ask, client side."""
    started = time.perf_counter()
    first, deltas, finished = 0.0, 0, None
    request = gateway_pb2.AskRequest(question=QUESTION, bypass_cache=bypass_cache,
                                     params=common_pb2.GenerationParams(max_tokens=max_tokens))
    async for event in stub.Ask(request, timeout=60):
        kind = event.WhichOneof("event")
        if kind == "delta":
            deltas += 1
            first = first or _ms_since(started)
        elif kind == "finished":
            finished = event.finished
    return first, _ms_since(started), deltas, finished


async def cpu_per_ask(mesh: BareMesh, n: int, *, bypass_cache: bool = True, max_tokens: int = 1,
                      warmup: int = 30) -> dict[str, Any]:
    """Sequential Asks: CPU ms per Ask of each bare process and of this client; latencies; gateway stage timings."""
    pids = mesh.pids | {"client": os.getpid()}
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(warmup):
            await ask(stub, bypass_cache=bypass_cache, max_tokens=max_tokens)
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        ttft, total, stages = [], [], {"embed_ms": [], "retrieve_ms": [], "first_token_ms": [], "total_ms": []}
        for _ in range(n):
            first, whole, _, finished = await ask(stub, bypass_cache=bypass_cache, max_tokens=max_tokens)
            ttft.append(first)
            total.append(whole)
            if finished is not None:
                for key, values in stages.items():
                    values.append(getattr(finished.timings, key))
        used = {name: (cpu_seconds(pid) - before[name]) / n * 1000 for name, pid in pids.items()}
    return {"asks": n, "bypass_cache": bypass_cache, "max_tokens": max_tokens, "cpu_ms_per_ask": used,
            "mesh_cpu_ms_per_ask": sum(used[r] for r in ROLES), "ttft_ms": percentiles(ttft),
            "total_ms": percentiles(total), "gateway_stage_ms": {k: percentiles(v) for k, v in stages.items()}}


async def hop_latency(mesh: BareMesh, n: int) -> dict[str, Any]:
    """Each hop called directly from this client, interleaved: Embed, Search, Generate (one token), bare Ask."""
    names = ("embedding.Embed", "retrieval.Search", "generation.Generate", "gateway.Ask (4 hops)",
             "gateway.Ask (cached shape)")
    samples: dict[str, list[float]] = {name: [] for name in names}
    channels = {role: grpc.aio.insecure_channel(mesh.address(role)) for role in ROLES}
    try:
        embed = embedding_pb2_grpc.EmbeddingServiceStub(channels["embedding"])
        search = retrieval_pb2_grpc.RetrievalServiceStub(channels["retrieval"])
        generate = generation_pb2_grpc.GenerationServiceStub(channels["generation"])
        gateway = gateway_pb2_grpc.GatewayServiceStub(channels["gateway"])
        embed_request = embedding_pb2.EmbedRequest(texts=[QUESTION], input_type=common_pb2.INPUT_TYPE_QUERY)
        search_request = retrieval_pb2.SearchRequest(tenant="default", query_text=QUESTION, query_vector=_VECTOR,
                                                     top_k=DEFAULT_TOP_K)
        generate_request = generation_pb2.GenerateRequest(question=QUESTION, passages=_passages(_hits(DEFAULT_TOP_K)),
                                                          params=common_pb2.GenerationParams(max_tokens=1))

        async def drain(call: Any) -> None:
            async for _ in call:
                pass

        calls = {"embedding.Embed": lambda: embed.Embed(embed_request, timeout=10),
                 "retrieval.Search": lambda: search.Search(search_request, timeout=10),
                 "generation.Generate": lambda: drain(generate.Generate(generate_request, timeout=10)),
                 "gateway.Ask (4 hops)": lambda: ask(gateway, bypass_cache=True),
                 "gateway.Ask (cached shape)": lambda: ask(gateway, bypass_cache=False)}
        for i in range(n + 20):  # the first 20 warm up
            for name in names:
                started = time.perf_counter()
                await calls[name]()
                if i >= 20:
                    samples[name].append(_ms_since(started))
    finally:
        for channel in channels.values():
            await channel.close()
    return {name: percentiles(values) for name, values in samples.items()}


async def relay_cost(mesh: BareMesh, fixed: dict[str, Any], *, streams: int, tokens: int,
                     extra_pids: dict[str, int] | None = None) -> dict[str, Any]:
    """`streams` Asks of `tokens` tokens each, started over RAMP_SECONDS: each process's CPU minus `streams` x its
    one-token fixed cost, per delta the client received (as bench/ask_cost.py measures the real mesh)."""
    pids = mesh.pids | {"client": os.getpid()} | (extra_pids or {})
    deltas = 0
    async with grpc.aio.insecure_channel(mesh.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def one(i: int) -> None:
            nonlocal deltas
            await asyncio.sleep(i * RAMP_SECONDS / streams)
            received = (await ask(stub, max_tokens=tokens))[2]
            deltas += received  # after the await: `deltas += await ...` would read deltas before it

        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        wall = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - wall
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    fixed_ms = fixed["cpu_ms_per_ask"]
    per_token = {name: max(0.0, used[name] - streams * fixed_ms.get(name, 0.0) / 1000) / max(deltas, 1) * 1e6
                 for name in pids}
    return {"streams": streams, "tokens_per_stream": tokens, "deltas": deltas, "wall_seconds": wall,
            "per_token_us": per_token, "relay_us_per_token": sum(per_token[r] for r in ("generation", "gateway")),
            "mesh_us_per_token": sum(per_token[r] for r in ROLES)}


async def measure_floor(*, asks: int = 300, hops: int = 200, streams: int = 100) -> dict[str, Any]:
    """The whole floor in one go: the sim LLM and the bare mesh started here, measured, stopped.

    fixed: sequential one-token Asks through the 4 hops (SSE included, sim TTFT 0); cached: the 3-message replay;
    canned: one-token Asks with no LLM behind generation (the offline answerer's shape); hops: each hop alone;
    relay: `streams` x 100 tokens at 20 tokens/s (SSE -> generation's stream -> gateway's stream -> client).
    """
    sim = SimProcess()
    figures: dict[str, Any] = {}
    try:
        sim.configure(ONE_TOKEN_SIM)
        async with BareMesh(sse_url=sim.base_url) as mesh:
            figures["fixed"] = await cpu_per_ask(mesh, asks)
            figures["cached"] = await cpu_per_ask(mesh, asks, bypass_cache=False)
            figures["hops_ms"] = await hop_latency(mesh, hops)
            if streams:
                sim.configure(LOAD_SIM)
                figures["relay"] = await relay_cost(mesh, figures["fixed"], streams=streams,
                                                    tokens=int(LOAD_SIM["max_tokens"]),
                                                    extra_pids={"sim-llm": sim.process.pid})
        async with BareMesh(sse_url=None) as mesh:
            figures["canned"] = await cpu_per_ask(mesh, asks)
    finally:
        sim.stop()
    return figures


def report(floor: dict[str, Any]) -> str:
    rows = ["## Bare mesh floor: CPU per Ask (ms, /proc user+system, sequential Asks)", "",
            "| Ask | " + " | ".join(ROLES) + " | mesh | client | TTFT p50 ms | total p50 ms |",
            "|---" * (len(ROLES) + 5) + "|"]
    for key, label in (("fixed", "4 hops, 1 token relayed from SSE"), ("canned", "4 hops, 1 canned token (no LLM)"),
                       ("cached", "cached shape (3 messages, no hop)")):
        if key in floor:
            f = floor[key]
            cpu = f["cpu_ms_per_ask"]
            rows.append(f"| {label} | " + " | ".join(f"{cpu[r]:.3f}" for r in ROLES)
                        + f" | {f['mesh_cpu_ms_per_ask']:.3f} | {cpu['client']:.3f} | {f['ttft_ms']['p50']:.2f} | "
                          f"{f['total_ms']['p50']:.2f} |")
    if "hops_ms" in floor:
        rows += ["", "## Latency of each hop, called directly from the client (ms)", "",
                 "| hop | p50 | p95 | p99 |", "|---|---|---|---|"]
        rows += [f"| {name} | {s['p50']:.3f} | {s['p95']:.3f} | {s['p99']:.3f} |"
                 for name, s in floor["hops_ms"].items()]
        stages = floor["fixed"]["gateway_stage_ms"]
        rows += ["", "Inside the bare gateway (p50 ms): " + ", ".join(f"{k} {v['p50']:.3f}" for k, v in stages.items())]
    if "relay" in floor:
        r = floor["relay"]
        rows += ["", f"## CPU per relayed token (us): {r['streams']} streams x {r['tokens_per_stream']} tokens at "
                     f"{LOAD_SIM['tokens_per_second']:.0f} tokens/s, {r['deltas']} deltas", "",
                 "| process | us per token |", "|---|---|"]
        rows += [f"| {name} | {us:.1f} |" for name, us in r["per_token_us"].items()]
        rows += [f"| **relay (generation + gateway)** | {r['relay_us_per_token']:.1f} |",
                 f"| **mesh (4 processes)** | {r['mesh_us_per_token']:.1f} |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("serve", help="run one bare server (what BareMesh starts)")
    one.add_argument("role", choices=ROLES)
    one.add_argument("--port", type=int, required=True)
    one.add_argument("--sse-url", default=None)
    for up in ROLES[:3]:
        one.add_argument(f"--{up}", default=None)
    parser.add_argument("--asks", type=int, default=300, help="sequential Asks per CPU measurement")
    parser.add_argument("--hops", type=int, default=200, help="calls per hop for the latency table")
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams for the cost per token (0: skip)")
    parser.add_argument("--write", action="store_true", help="also write bench/results/bare_mesh.{json,md}")
    args = parser.parse_args(argv)
    if args.command == "serve":
        upstreams = {up: getattr(args, up) for up in ROLES[:3]}
        # The services' own loop (services/runtime/serve.py): the floor must not pay asyncio's extra cost per event.
        uvloop.run(serve(args.role, args.port, sse_url=args.sse_url, upstreams=upstreams))
        return 0
    floor = asyncio.run(measure_floor(asks=args.asks, hops=args.hops, streams=args.streams))
    markdown = report(floor)
    print(markdown)
    if args.write:
        write_results("bare_mesh", figures=floor, targets=[], markdown=markdown,
                      notes=["The bare servers, the sim LLM and this client share the machine's cores; CPU is read "
                             "per process from /proc."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
