"""The Ask pipeline: validate, prefetch (cache ∥ query embedding ∥ history), retrieve, then stream the answer.

Stream contract (GatewayService.Ask): exactly one Sources event, then text deltas as generation produces them
(the first at once; deltas arriving back to back merged into at most one message per COALESCE_WINDOW_MS), then
one AskFinished with usage, cache status and per-stage timings.
Everything that can be refused (bad input) is checked in ``plan`` before the first event. A failure after the
first event ends the stream with that error's status; a started generation stream is never retried.
The Redis writes after the answer are best effort within their stage budgets: the conversation turn before
AskFinished (a follow-up sent at once must see it), so a slow or hung Redis delays AskFinished by at most that
budget, never by its socket timeout; the cache entry is kept in this process at once and written to Redis in the
background (ResponseCache.store_later), off the Ask's critical path.
Every stage (cache, history, embed, retrieve, first token, total) is timed the same way: into its StageTimings field
and ragfleet_gateway_ask_stage_seconds{stage}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

from prometheus_client import Histogram
from redis.exceptions import RedisError

from services.gateway.concurrency import cancel_all, gather_or_cancel
from services.gateway.config import AskLimits, StageBudgets
from services.gateway.conversations import ConversationStore
from services.gateway.deadlines import Deadline
from services.gateway.fusion import query_variants, rrf_merge
from services.gateway.response_cache import CachedAnswer, ResponseCache
from services.gateway.upstreams import GenerationClient, RetrievalClient
from services.runtime import telemetry
from services.runtime.coalesce import Coalescer
from services.runtime.embed_client import EmbedClient
from services.runtime.errors import DeadlineExceeded, Unavailable, require
from services.runtime.limits import check_filters, check_generation_params
from services.runtime.pb.ragfleet.v1 import common_pb2, gateway_pb2, generation_pb2, retrieval_pb2

log = logging.getLogger("ragfleet.gateway.ask")

ASK_STAGE_SECONDS = Histogram("ragfleet_gateway_ask_stage_seconds", "Ask time per stage", ["stage"],
                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
# Each stage's histogram child, looked up once (labels() is a lock and two dict lookups a call).
_STAGE_SECONDS = {stage: ASK_STAGE_SECONDS.labels(stage)
                  for stage in ("cache", "history", "embed", "retrieve", "first_token", "total")}
_SEARCH_MODES = frozenset(common_pb2.SearchMode.values())
# The cache outcome each status is recorded as (ResponseCache.record); a miss without a version is an error.
_CACHE_RESULT = {gateway_pb2.CACHE_STATUS_HIT_EXACT: "hit_exact", gateway_pb2.CACHE_STATUS_HIT_SEMANTIC: "hit_semantic",
                 gateway_pb2.CACHE_STATUS_BYPASS: "bypass"}

MAX_CONVERSATION_ID_CHARS = 128
# A cache hit is replayed in pieces this large: few messages keep a hit well under a millisecond.
REPLAY_CHUNK_CHARS = 1024
_CACHEABLE = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class _Stage:
    """Times one stage of one Ask into its StageTimings field (``<stage>_ms``) and its histogram, however the
    stage ends (``with _Stage(timings, "embed"): ...``)."""

    __slots__ = ("_timings", "_field", "_histogram", "_start")

    def __init__(self, timings: gateway_pb2.StageTimings, stage: str) -> None:
        self._timings = timings
        self._field = stage + "_ms"
        self._histogram = _STAGE_SECONDS[stage]

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._start
        setattr(self._timings, self._field, elapsed * 1000.0)
        self._histogram.observe(elapsed)


@dataclass(frozen=True)
class AskPlan:
    """A validated request: what to search for, and how the answer will be cached."""

    question: str
    top_k: int
    variants: list[str]
    use_cache: bool
    cache_key: str | None
    # Everything besides the question that shapes the answer; a semantic hit must share it.
    fingerprint: bytes = b""


@dataclass
class _Prefetched:
    version: int | None = None
    hit: CachedAnswer | None = None
    # The reply's own repeated fields, not list copies: a copy and its conversion back into a SearchRequest cost
    # ~45 us of the 384-d vector's ~2.
    vectors: Sequence[Sequence[float]] = ()
    history: list[common_pb2.ChatTurn] = field(default_factory=list)
    # False until the history is known (no conversation, or loaded); a failed load stays False.
    history_known: bool = True

    @property
    def cacheable(self) -> bool:
        """An answer depends on the question alone only when there is no earlier turn."""
        return self.history_known and not self.history


class _Prefetch:
    """One Ask's prefetch: each step fills its part of `out` and records its stage time."""

    def __init__(self, pipeline: AskPipeline, tenant: str, request: gateway_pb2.AskRequest, plan: AskPlan,
                 deadline: Deadline, timings: gateway_pb2.StageTimings) -> None:
        self.pipeline = pipeline
        self.tenant = tenant
        self.request = request
        self.plan = plan
        self.deadline = deadline
        self.timings = timings
        self.out = _Prefetched(history_known=not request.conversation_id)

    async def run(self, *, parallel: bool) -> _Prefetched:
        steps: list[Callable[[], Awaitable[None]]] = []
        if self.plan.use_cache:
            if self._hot():
                # The entry is in L1, so a hit is all but certain. Confirm its corpus version before starting an
                # embedding RPC that would only be cancelled: from the followed versions, with no I/O, or else one
                # Redis GET; a stale entry falls through.
                if self.lookup_hot():
                    return self.out
                await self.lookup_cache()
                if self.answered():
                    return self.out
            else:
                steps.append(self.lookup_cache)
        if self.request.conversation_id:
            steps.append(self.load_history)
        steps.append(self.embed_query)  # last: the sequential path may skip it
        await (self._concurrently(steps) if parallel and len(steps) > 1 else self._one_by_one(steps))
        return self.out

    def answered(self) -> bool:
        return self.out.hit is not None and self.out.cacheable

    def _hot(self) -> bool:
        """A question with its answer in L1 (outside a conversation, where a hit needs the history first)."""
        return not self.request.conversation_id and self.pipeline.cache.has_local(self.plan.cache_key)

    async def _concurrently(self, steps: list[Callable[[], Awaitable[None]]]) -> None:
        """Run every step at once; stop (cancelling the rest) at a usable hit or at the first failure. The first
        step (the cache lookup, else the history load: both absorb their own failures) runs in this task while the
        others run as tasks: one task and one wait fewer than a task each."""
        tasks = [asyncio.ensure_future(step()) for step in steps[1:]]
        try:
            await steps[0]()
            pending = set()
            for task in tasks:
                if not task.done():
                    pending.add(task)
                elif not self.answered():
                    task.result()  # the first failure (e.g. embedding down) ends the Ask with its error
            while pending and not self.answered():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        finally:
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a failure that lost to a usable hit is not logged as unretrieved
            await cancel_all(tasks)

    async def _one_by_one(self, steps: list[Callable[[], Awaitable[None]]]) -> None:
        """The benchmark baseline (AskLimits.parallel_fanout=False)."""
        for step in steps:
            if self.answered():
                return
            await step()

    def lookup_hot(self) -> bool:
        """The whole lookup when it needs no I/O (see ResponseCache.lookup_hot): True if it answered."""
        with _Stage(self.timings, "cache"):
            found = self.pipeline.cache.lookup_hot(self.tenant, self.plan.cache_key)  # type: ignore[arg-type]
        if found is None:
            return False
        self.out.version, self.out.hit = found
        return self.answered()

    async def lookup_cache(self) -> None:
        pipeline = self.pipeline
        with _Stage(self.timings, "cache"):
            try:
                async with asyncio.timeout(self.deadline.budget(pipeline.budgets.cache, "cache")):
                    self.out.version, self.out.hit = await pipeline.cache.lookup(self.tenant, self.plan.cache_key)
            except TimeoutError:
                log.warning("response cache lookup exceeded its %.0f ms budget; treating as a miss",
                            pipeline.budgets.cache * 1000)

    async def embed_query(self) -> None:
        pipeline = self.pipeline
        with _Stage(self.timings, "embed"):
            response = await pipeline.embedding.embed(self.plan.variants, input_type=common_pb2.INPUT_TYPE_QUERY,
                                                      timeout=self.deadline.budget(pipeline.budgets.embed, "embed"))
            self.out.vectors = [e.values for e in response.embeddings]

    async def load_history(self) -> None:
        pipeline = self.pipeline
        with _Stage(self.timings, "history"):
            try:
                async with asyncio.timeout(self.deadline.budget(pipeline.budgets.history, "history")):
                    self.out.history = await pipeline.conversations.history(self.tenant, self.request.conversation_id)
                self.out.history_known = True
            except (TimeoutError, OSError, RedisError) as exc:
                # Answering without history beats failing the question.
                log.warning("conversation history unavailable, answering without it: %s", exc)


class AskPipeline:
    def __init__(self, *, embedding: EmbedClient, retrieval: RetrievalClient, generation: GenerationClient,
                 cache: ResponseCache, conversations: ConversationStore, limits: AskLimits,
                 budgets: StageBudgets) -> None:
        self.embedding = embedding
        self.retrieval = retrieval
        self.generation = generation
        self.cache = cache
        self.conversations = conversations
        self.limits = limits
        self.budgets = budgets

    # -- validation -------------------------------------------------------------------------------------------------

    def plan(self, tenant: str, request: gateway_pb2.AskRequest) -> AskPlan:
        """Validate the request (raises InvalidArgument naming the field and limit) and fix what the run needs."""
        question = request.question.strip()
        limits = self.limits
        require(bool(question), "question: must not be empty")
        require(len(question) <= limits.max_question_chars,
                f"question: {len(question)} characters, the limit is {limits.max_question_chars}")
        require(0 <= request.top_k <= limits.max_top_k,
                f"top_k: must be between 1 and {limits.max_top_k} (0 = server default {limits.default_top_k}), "
                f"got {request.top_k}")
        require(len(request.conversation_id) <= MAX_CONVERSATION_ID_CHARS,
                f"conversation_id: at most {MAX_CONVERSATION_ID_CHARS} characters")
        require(request.mode in _SEARCH_MODES, f"mode: unknown search mode {request.mode}")
        check_filters(request.filters)
        # The generation service's own checks and limits: refused here, before Sources, not after them.
        check_generation_params(request.params, max_tokens=limits.max_tokens)
        top_k = request.top_k or limits.default_top_k
        # Conversations use the cache too, but only while their history is empty (see _prefetch).
        use_cache = self.cache.enabled and not request.bypass_cache
        fingerprint = _fingerprint(request, top_k) if use_cache else b""  # only the cache reads it
        key = self.cache.key(tenant, question, fingerprint) if use_cache else None
        return AskPlan(question, top_k, query_variants(question, limits.query_variants), use_cache, key,
                       fingerprint)

    # -- the stream -------------------------------------------------------------------------------------------------

    async def stream(self, tenant: str, request: gateway_pb2.AskRequest, plan: AskPlan,
                     deadline: Deadline) -> AsyncIterator[gateway_pb2.AskResponse]:
        started = time.perf_counter()
        timings = gateway_pb2.StageTimings()
        trace_id = telemetry.current_trace_id() or ""  # the Ask's server span: AskFinished and exemplars carry it
        pre = await self._prefetch(tenant, request, plan, deadline, timings)
        use_cache = plan.use_cache and pre.cacheable
        status = gateway_pb2.CACHE_STATUS_MISS if use_cache else gateway_pb2.CACHE_STATUS_BYPASS
        hit = pre.hit if use_cache else None
        if hit is not None:
            status = gateway_pb2.CACHE_STATUS_HIT_EXACT
        elif use_cache and self.cache.config.semantic and pre.version is not None and pre.vectors:
            hit = self.cache.lookup_semantic(tenant, pre.version, pre.vectors[0], fingerprint=plan.fingerprint)
            if hit is not None:
                status = gateway_pb2.CACHE_STATUS_HIT_SEMANTIC
        self.cache.record(_CACHE_RESULT.get(status, "miss" if pre.version is not None else "error"))
        if hit is not None:
            if request.conversation_id:
                await self._remember_turn(tenant, request.conversation_id, plan.question, hit.answer, deadline)
            for event in _replay(hit, status, timings, started, request.conversation_id, trace_id):
                yield event
            return

        first = await self._retrieve(tenant, request, plan, pre.vectors, deadline, timings)
        yield first
        sources = first.sources

        generate = generation_pb2.GenerateRequest(question=plan.question, passages=sources.passages,
                                                  history=pre.history, params=request.params)
        parts: list[str] = []
        finished: generation_pb2.GenerationFinished | None = None
        events = self.generation.generate_stream(generate, timeout=deadline.budget(self.budgets.generate, "generate"))
        if self.limits.coalesce_window > 0:
            # Generation's own window already spaces its messages a window apart, and those pass unheld; this merges
            # what still comes back to back (its window off, or a burst after a network stall).
            events = Coalescer(events, text=_delta_text, join=_delta_event, window=self.limits.coalesce_window)
        # aclosing: when the client leaves, closing this generator cancels the generation call (and its LLM request).
        async with contextlib.aclosing(events):
            async for event in events:
                if event.WhichOneof("event") == "delta":
                    if not parts:
                        timings.first_token_ms = _ms_since(started)
                        _STAGE_SECONDS["first_token"].observe(timings.first_token_ms / 1000, _exemplar(trace_id))
                    parts.append(event.delta.text)
                    yield gateway_pb2.AskResponse(delta=event.delta)
                else:
                    finished = event.finished
        if finished is None:
            raise Unavailable("generation service: the stream ended without a final message")

        answer = "".join(parts)
        if (use_cache and plan.cache_key is not None and pre.version is not None and answer and not finished.fallback_used
                and finished.finish_reason in _CACHEABLE):
            # Served by this replica from now on; the Redis copy follows in the background, within the cache budget.
            self.cache.store_later(tenant, plan.cache_key, _cache_entry(pre.version, answer, sources, finished),
                                   pre.vectors[0] if pre.vectors else None, fingerprint=plan.fingerprint,
                                   timeout=self.budgets.cache)
        if request.conversation_id:
            await self._remember_turn(tenant, request.conversation_id, plan.question, answer, deadline)
        timings.total_ms = _ms_since(started)
        _STAGE_SECONDS["total"].observe(timings.total_ms / 1000, _exemplar(trace_id))
        telemetry.record_stages(timings)
        yield gateway_pb2.AskResponse(finished=gateway_pb2.AskFinished(
            finish_reason=finished.finish_reason, usage=finished.usage, cache_status=status, timings=timings,
            model=finished.model, conversation_id=request.conversation_id, fallback_used=finished.fallback_used,
            trace_id=trace_id))

    # -- stages -----------------------------------------------------------------------------------------------------

    async def _prefetch(self, tenant: str, request: gateway_pb2.AskRequest, plan: AskPlan, deadline: Deadline,
                        timings: gateway_pb2.StageTimings) -> _Prefetched:
        """Cache lookup ∥ query embedding ∥ history load. A usable cache hit cancels the embedding at once; in a
        conversation the (cheap) history load must finish first, since a hit is usable only with no history."""
        prefetch = _Prefetch(self, tenant, request, plan, deadline, timings)
        return await prefetch.run(parallel=self.limits.parallel_fanout)

    async def _retrieve(self, tenant: str, request: gateway_pb2.AskRequest, plan: AskPlan,
                        vectors: Sequence[Sequence[float]], deadline: Deadline,
                        timings: gateway_pb2.StageTimings) -> gateway_pb2.AskResponse:
        """Search every query variant (concurrently), fuse by RRF, number the passages for [n] citations. Returns
        the Sources event itself: its passages are built in place, once, and the generation request and the cache
        entry take them from it."""
        async def search(variant: str, vector: Sequence[float]) -> retrieval_pb2.SearchResponse:
            return await self.retrieval.search(retrieval_pb2.SearchRequest(
                tenant=tenant, query_text=variant, query_vector=vector, top_k=plan.top_k, filters=request.filters,
                mode=request.mode, max_context_tokens=self.limits.max_context_tokens,
                bypass_cache=request.bypass_cache), timeout=deadline.budget(self.budgets.retrieve, "retrieve"))

        with _Stage(timings, "retrieve"):
            pairs = list(zip(plan.variants, vectors))
            if len(pairs) == 1:  # the default (one variant): no task to gather
                responses = [await search(*pairs[0])]
            elif self.limits.parallel_fanout:
                responses = await gather_or_cancel(search(v, vec) for v, vec in pairs)
            else:
                responses = [await search(v, vec) for v, vec in pairs]
            hits = rrf_merge([r.hits for r in responses], top_k=plan.top_k)
        timings.rerank_ms = max((r.timings_ms.get("rerank", 0.0) for r in responses), default=0.0)
        event = gateway_pb2.AskResponse(sources=gateway_pb2.Sources())
        add = event.sources.passages.add
        for i, h in enumerate(hits, start=1):
            add(number=i, chunk_id=h.chunk_id, doc_id=h.doc_id, title=h.title, text=h.text, score=h.score,
                metadata=h.metadata)
        return event

    async def _remember_turn(self, tenant: str, conversation_id: str, question: str, answer: str,
                             deadline: Deadline) -> None:
        await _best_effort("conversation store", self.budgets.history, deadline,
                           lambda: self.conversations.append(tenant, conversation_id, question, answer))


async def _best_effort(stage: str, stage_budget: float, deadline: Deadline,
                       write: Callable[[], Awaitable[None]]) -> None:
    """Run a write the answer does not depend on within its stage budget (cut to the client's deadline); a
    failure or timeout is logged and skipped, so the finished answer still reaches the client."""
    try:
        timeout = deadline.budget(stage_budget, stage)
        async with asyncio.timeout(timeout):  # in this task: wait_for would start one more (Python 3.11)
            await write()
    except DeadlineExceeded:
        log.warning("%s skipped: the client's deadline is spent", stage)
    except TimeoutError:
        log.warning("%s skipped: Redis did not answer within %.0f ms", stage, timeout * 1000)
    except (OSError, RedisError) as exc:
        log.warning("%s failed, skipped: %s", stage, exc)


def _cache_entry(version: int, answer: str, sources: gateway_pb2.Sources,
                 finished: generation_pb2.GenerationFinished) -> CachedAnswer:
    usage = (finished.usage.prompt_tokens, finished.usage.completion_tokens, finished.usage.total_tokens)
    return CachedAnswer(version, answer, sources.SerializeToString(), finished.finish_reason, usage, finished.model)


def _fingerprint(request: gateway_pb2.AskRequest, top_k: int) -> bytes:
    """Everything besides the question and tenant that changes the answer."""
    parts = [request.params.SerializeToString(deterministic=True), str(top_k).encode(), str(request.mode).encode()]
    parts += [f.SerializeToString(deterministic=True) for f in request.filters]
    return b"\x1f".join(parts)


def _delta_text(event: generation_pb2.GenerateResponse) -> str | None:
    return event.delta.text if event.HasField("delta") else None


def _delta_event(text: str) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=text))


def _exemplar(trace_id: str) -> dict[str, str] | None:
    """Links a histogram bucket to one Ask's trace (exposed with OpenMetrics, e.g. to Prometheus/Grafana)."""
    return {"trace_id": trace_id} if trace_id else None


def _replay(hit: CachedAnswer, status: int, timings: gateway_pb2.StageTimings, started: float,
            conversation_id: str, trace_id: str = "") -> list[gateway_pb2.AskResponse]:
    """A cached answer as the same event sequence a generated one has. Usage is zero: no tokens were spent. The
    Sources and delta messages are built by the entry's first hit and kept on it (L1 holds the entry): a later hit
    parses and copies nothing."""
    if not hit.replay:
        hit.replay.append(gateway_pb2.AskResponse(sources=gateway_pb2.Sources.FromString(hit.sources)))
        for offset in range(0, len(hit.answer), REPLAY_CHUNK_CHARS):
            hit.replay.append(gateway_pb2.AskResponse(
                delta=common_pb2.TextDelta(text=hit.answer[offset:offset + REPLAY_CHUNK_CHARS])))
    timings.first_token_ms = timings.total_ms = _ms_since(started)
    _STAGE_SECONDS["total"].observe(timings.total_ms / 1000, _exemplar(trace_id))
    telemetry.record_stages(timings)
    return [*hit.replay, gateway_pb2.AskResponse(finished=gateway_pb2.AskFinished(
        finish_reason=hit.finish_reason, usage=common_pb2.Usage(), cache_status=status, timings=timings,
        model=hit.model, conversation_id=conversation_id, trace_id=trace_id))]
